"""Load check for the OpenAI-compatible server, on loopback only, bounded in count and time.

    python benchmarks/load.py --streams 200 --malformed 1000 --max-tokens 32 --deadline 600

Starts `dllm-cache serve` in-process on 127.0.0.1 (a free port), then drives N concurrent streaming
chat requests and M malformed requests, and reports throughput, p50/p95 latency, errors and whether
the server was still healthy afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time

import httpx
import uvicorn

from dllm_cache.models.loading import load
from dllm_cache.serve.app import create_app

MALFORMED = [
    (b"{not json", "chat"),
    (json.dumps({"model": "tiny-llada"}).encode(), "chat"),
    (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}).encode(), "chat"),
    (json.dumps({"model": "tiny-llada", "prompt": "x", "max_tokens": -5}).encode(), "text"),
    (json.dumps({"model": "tiny-llada", "prompt": "x", "temperature": "hot"}).encode(), "text"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _stream(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> tuple[float, int, bool]:
    body = {
        "model": "tiny-llada",
        "stream": True,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": f"What is {i % 20} + {(i * 7) % 20}?"}],
    }
    t0 = time.perf_counter()
    chunks, done = 0, False
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return time.perf_counter() - t0, 0, False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunks += 1
    return time.perf_counter() - t0, chunks, done


async def _malformed(client: httpx.AsyncClient, url: str, i: int) -> int:
    body, kind = MALFORMED[i % len(MALFORMED)]
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    r = await client.post(url + path, content=body, headers={"content-type": "application/json"})
    return r.status_code


async def main_async(args: argparse.Namespace, url: str) -> dict:
    limits = httpx.Limits(max_connections=args.streams + 50)
    async with httpx.AsyncClient(timeout=args.deadline, limits=limits) as client:
        t0 = time.perf_counter()
        streams = [asyncio.create_task(_stream(client, url, i, args.max_tokens)) for i in range(args.streams)]
        bad = [asyncio.create_task(_malformed(client, url, i)) for i in range(args.malformed)]
        done, pending = await asyncio.wait([*streams, *bad], timeout=args.deadline)
        for p in pending:
            p.cancel()
        wall = time.perf_counter() - t0
        results = [s.result() for s in streams if s in done and not s.exception()]
        lat = sorted(r[0] for r in results if r[2])
        codes = [b.result() for b in bad if b in done and not b.exception()]
        healthy = (await client.get(url + "/health")).status_code == 200
        metrics = (await client.get(url + "/metrics")).text
    return {
        "streams": args.streams,
        "streams_completed": len(lat),
        "streams_failed": args.streams - len(lat),
        "stream_latency_p50_s": round(statistics.median(lat), 3) if lat else None,
        "stream_latency_p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3) if lat else None,
        "requests_per_s": round(len(lat) / wall, 2),
        "malformed": args.malformed,
        "malformed_status_counts": {str(c): codes.count(c) for c in sorted(set(codes))},
        "malformed_unanswered": args.malformed - len(codes),
        "wall_s": round(wall, 1),
        "healthy_after": healthy,
        "batches": [line for line in metrics.splitlines() if line.startswith("dllm_batch")],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-llada")
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--malformed", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--deadline", type=float, default=600.0)
    args = ap.parse_args()
    llm = load(args.model)
    app = create_app(
        llm, model_name="tiny-llada", max_batch_size=args.max_batch_size, max_queue=args.streams + 10
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        report = asyncio.run(main_async(args, f"http://127.0.0.1:{port}"))
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

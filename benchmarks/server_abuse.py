"""Abuse check for the OpenAI-compatible server (issue 21), on loopback only, bounded in count and time.

    OMP_NUM_THREADS=1 python benchmarks/server_abuse.py --disconnects 500 --deadline 240

Starts `dllm-cache serve` (tiny-llada, API key from DLLM_CACHE_API_KEY) as a child process on
127.0.0.1, then sends, by kind: oversized bodies (20 MB with and without a content-length, 1 MB
prompts, 200k and 30k chat messages), bad encodings (invalid UTF-8, lone surrogates, UTF-16, NaN,
deep JSON...), wrong types, client-named paths, bad keys, unknown routes, malformed HTTP, randomly
timed disconnects at every phase of a request and of a stream, idle connections, and a flood of
concurrent valid requests. Meanwhile a well-behaved client (its own process) polls /health and asks
a short completion every second. Reports requests and status codes by kind, every response that is
a 500 or not OpenAI's JSON error shape, the well-behaved client's worst latencies, the server's RSS
(baseline, peak, after) and dllm_in_flight once idle. Prints a markdown summary and a JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict

import httpx

MODEL = "tiny-llada"
KEY = "abuse-check-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if not ln.startswith("#")}


def _well_behaved(url: str, stop: mp.Event, out: mp.Queue) -> None:
    """A polite client in its own process: /health every 50 ms, a short completion every second."""
    health, completion, failures = [], [], Counter()
    body = {"model": MODEL, "prompt": "Tom has 3 apples.", "max_tokens": 8, "dllm": {"block_length": 8}}
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as c:
        last = 0.0
        while not stop.is_set():
            t = time.perf_counter()
            r = c.get("/health")
            health.append((time.time(), time.perf_counter() - t))
            if r.status_code != 200:
                failures[f"health {r.status_code}"] += 1
            if time.perf_counter() - last > 1.0:
                last = t = time.perf_counter()
                r = c.post("/v1/completions", json=body)
                completion.append(time.perf_counter() - t)
                if r.status_code != 200:
                    failures[f"completion {r.status_code}"] += 1
            time.sleep(0.05)
    out.put({"health": health, "completion": completion, "failures": dict(failures)})


class Tally:
    def __init__(self) -> None:
        self.codes: dict[str, Counter] = defaultdict(Counter)
        self.bad: list[str] = []  # a 500, or an error that is not OpenAI's JSON shape
        self.phases: list[tuple[str, float, float]] = []  # name, start, end (wall clock)

    def response(self, kind: str, status: int, content_type: str, body: bytes) -> None:
        self.codes[kind][str(status)] += 1
        if status >= 500 and status != 503:
            self.bad.append(f"{kind}: {status} {body[:120]!r}")
        if status >= 400:
            try:
                err = json.loads(body)["error"]
                assert content_type.startswith("application/json")
                assert set(err) == {"message", "type", "param", "code"}
            except Exception:  # noqa: BLE001 - any shape problem is the finding
                self.bad.append(f"{kind}: {status} not OpenAI's error shape: {body[:120]!r}")

    def event(self, kind: str, what: str) -> None:
        self.codes[kind][what] += 1


async def _post(t: Tally, c: httpx.AsyncClient, kind: str, path: str, content, headers=None) -> None:
    try:
        h = {"content-type": "application/json", **AUTH, **(headers or {})}
        r = await c.post(path, content=content, headers=h)
        t.response(kind, r.status_code, r.headers.get("content-type", ""), r.content)
    except httpx.HTTPError as e:
        t.event(kind, f"client error: {type(e).__name__}")


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _c(**kw) -> dict:
    return {"model": MODEL, "prompt": "Tom has 3 apples.", "max_tokens": 8, **kw}


def _chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **kw}


BIG = _j({"model": MODEL, "prompt": "x" * 20_000_000})
SIZES = [
    ("20 MB body, content-length", "/v1/completions", BIG, 3),
    ("20 MB body, chunked", "/v1/completions", None, 3),
    ("1 MB prompt", "/v1/completions", _j({"model": MODEL, "prompt": "y" * 1_000_000}), 5),
    ("1 MB prompt, \\u-escaped", "/v1/completions", _j({"model": MODEL, "prompt": "é" * 150_000}), 3),
    (
        "200k chat messages",
        "/v1/chat/completions",
        _j(_chat(messages=[{"role": "user", "content": "a"}] * 200_000)),
        2,
    ),
    (
        "30k chat messages",
        "/v1/chat/completions",
        _j(_chat(messages=[{"role": "user", "content": "a"}] * 30_000)),
        3,
    ),
    ("2000 stop strings", "/v1/completions", _j(_c(stop=["a"] * 2000)), 3),
]
ENCODINGS = [
    b'{"model": "tiny-llada", "prompt": "\xff\xfe bad"}',
    b'{"model": "tiny-llada", "prompt": "\\ud800"}',
    b'{"model": "tiny-llada", "messages": [{"role": "user", "content": "a\\udfff"}]}',
    '{"model": "tiny-llada", "prompt": "hi"}'.encode("utf-16"),
    b'\xef\xbb\xbf{"model": "tiny-llada", "prompt": "hi"}',
    b'{"model": "tiny-llada", "prompt": "hi", "temperature": NaN}',
    b'{"model": "tiny-llada", "prompt": "hi", "temperature": -Infinity}',
    b'{"model": "tiny-llada", "prompt": "hi", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}",
    b"[" * 200_000 + b"]" * 200_000,
    b'"just a string"',
    b"",
    b"{not json",
    b'{"model": "tiny-llada", "prompt": "hi"}{"model": "tiny-llada"}',
    b'{"model": "tiny-llada", "prompt": "\x00\x01\x02"}',
]
TYPES = [
    _c(seed=2**70),
    _c(seed=-(2**70)),
    _c(temperature=1e308),
    _c(temperature=-1),
    _c(temperature="hot"),
    _c(max_tokens=True),
    _c(max_tokens="8"),
    _c(max_tokens=1.5),
    _c(max_tokens=-1),
    _c(max_tokens=2**70),
    _c(top_p=0),
    _c(n=2),
    _c(stream="yes"),
    _c(stop=5),
    _c(prompt=["a", "b"]),
    _c(prompt=123),
    _c(prompt=None),
    _c(model=["tiny-llada"]),
    _c(dllm="fast"),
    _c(dllm={"steps": True}),
    _c(dllm={"steps": 3, "block_length": 4}),
    _c(dllm={"steps": 10**9}),
    _c(dllm={"block_length": 10**6}),
    _c(dllm={"threshold": 2.0}),
    _c(dllm={"unknown": 1}),
    _c(dllm={"cache": "nope"}),
    _c(dllm={"cache": "dkv", "cache_args": {"refresh_interval": 1e308}}),
    _c(dllm={"cache": "dkv", "cache_args": {"refresh_interval": 0}}),
    _c(dllm={"cache": "dllm-cache", "cache_args": {"prompt_interval": [1]}}),
    _c(dllm={"preset": "none+reference:temperature=1"}),
    _c(dllm={"preset": "none+reference:gen_length=8"}),
    _c(dllm={"preset": "none+reference:record_steps=true"}),
    _c(dllm={"preset": "none+threshold:threshold=NaN"}),
    _c(dllm={"preset": "none+nope"}),
    _c(stream=True, dllm={"steps": 3, "block_length": 4}),
    _c(stream=True, seed=2**70),
    _chat(messages=[{"role": "wizard", "content": "hi"}]),
    _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}]),
    _chat(messages="hi"),
    _chat(messages=[]),
]
PATHS = [
    'none+guided:guide_model="/etc"',
    'none+guided:guide_model="/no/such/dir"',
    "none+guided:guide_model=../../../etc",
    'none+guided:guide_model="~root"',
    'none+guided:guide_model="C:\\\\Windows"',
    "dkv:variant=/etc/passwd",
]


async def _sizes(t: Tally, url: str) -> None:
    async def chunks():  # no content-length: the limit must hold while reading
        for i in range(0, len(BIG), 1 << 16):
            yield BIG[i : i + (1 << 16)]

    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for name, path, body, n in SIZES:
            for _ in range(n):
                await _post(t, c, f"size: {name}", path, body if body is not None else chunks())


async def _bad_bodies(t: Tally, url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        for _ in range(3):
            for raw in ENCODINGS:
                path = "/v1/chat/completions" if b"messages" in raw else "/v1/completions"
                await _post(t, c, "encoding", path, raw)
            for obj in TYPES:
                path = "/v1/chat/completions" if "messages" in obj else "/v1/completions"
                await _post(t, c, "type / value", path, _j(obj))
            for spec in PATHS:
                await _post(t, c, "client-named path", "/v1/completions", _j(_c(dllm={"preset": spec})))
            for h in ({"authorization": ""}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
                await _post(t, c, "auth", "/v1/completions", _j(_c()), headers=h)
            for method, path in (("GET", "/v1/nope"), ("GET", "/v1/completions"), ("DELETE", "/v1/models")):
                r = await c.request(method, path, headers=AUTH)
                t.response("route / method", r.status_code, r.headers.get("content-type", ""), r.content)


async def _raw(port: int, data: bytes, read: bool) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 10) if read else b""
    finally:
        writer.close()


async def _malformed_http(t: Tally, port: int) -> None:
    for data in (
        b"NOT HTTP\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"\x16\x03\x01\x00\xa5",
    ):
        for _ in range(5):
            reply = await _raw(port, data, read=True)
            head, _, body = reply.partition(b"\r\n\r\n")
            if not head:
                t.event("malformed HTTP", "closed")
                continue
            status = int(head.split()[1])
            ctype = next(
                (
                    ln.split(b":", 1)[1].strip().decode()
                    for ln in head.split(b"\r\n")
                    if ln.lower().startswith(b"content-type")
                ),
                "",
            )
            t.response("malformed HTTP", status, ctype, body)


STREAM_BODY = _j(_c(max_tokens=32, stream=True, dllm={"block_length": 8}))
PHASES = (
    "tcp connect, close",
    "partial headers, close",
    "partial body, close",
    "non-streaming, leave before answer",
    "stream, leave after headers",
    "stream, leave after first event",
    "stream, leave mid-stream",
    "stream, leave before [DONE]",
)


async def _disconnect(t: Tally, url: str, port: int, phase: str, rng: random.Random) -> None:
    kind = "disconnect: " + phase
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(STREAM_BODY)}\r\n\r\n"
    ).encode()
    try:
        if phase == "tcp connect, close":
            await _raw(port, b"", read=False)
        elif phase == "partial headers, close":
            await _raw(port, head[: rng.randrange(1, len(head))], read=False)
        elif phase == "partial body, close":
            await _raw(port, head + STREAM_BODY[: rng.randrange(1, len(STREAM_BODY))], read=False)
        elif phase == "non-streaming, leave before answer":
            async with httpx.AsyncClient(base_url=url, timeout=rng.uniform(0.02, 1.0)) as c:
                try:
                    r = await c.post("/v1/completions", content=_j(_c(max_tokens=32)), headers=AUTH)
                    t.response(kind, r.status_code, r.headers.get("content-type", ""), r.content)
                    return
                except httpx.TimeoutException:
                    pass
        else:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                async with c.stream("POST", "/v1/completions", content=STREAM_BODY, headers=AUTH) as r:
                    if r.status_code != 200:
                        t.response(kind, r.status_code, r.headers.get("content-type", ""), await r.aread())
                        return
                    stop_after = {"stream, leave after headers": 0, "stream, leave after first event": 1}
                    limit = stop_after.get(phase, rng.randrange(2, 8))
                    seen = 0
                    async for line in r.aiter_lines():
                        if seen >= limit and phase != "stream, leave before [DONE]":
                            break
                        if phase == "stream, leave before [DONE]" and '"finish_reason": "' in line:
                            break
                        seen += line.startswith("data: ")
        t.event(kind, "left")
    except httpx.HTTPError as e:
        t.event(kind, f"client error: {type(e).__name__}")


async def _disconnects(t: Tally, url: str, port: int, n: int, seed: int) -> None:
    rng = random.Random(seed)
    wave = 25
    for start in range(0, n, wave):
        tasks = []
        for _ in range(min(wave, n - start)):
            tasks.append(_disconnect(t, url, port, rng.choice(PHASES), random.Random(rng.random())))
        await asyncio.gather(*(_delayed(task, rng.uniform(0, 0.5)) for task in tasks))


async def _delayed(coro, delay: float) -> None:
    await asyncio.sleep(delay)
    await coro


async def _flood(t: Tally, url: str, n: int) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=None)) as c:
        await asyncio.gather(
            *(_post(t, c, "flood: valid completions", "/v1/completions", _j(_c())) for _ in range(n))
        )

        async def health() -> None:
            r = await c.get("/health")
            t.response("flood: /health", r.status_code, r.headers.get("content-type", ""), r.content)

        await asyncio.gather(*(health() for _ in range(3 * n)))


async def _idle(t: Tally, port: int, n: int, keep_alive: int) -> None:
    async def one() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        t0 = time.perf_counter()
        try:
            data = await asyncio.wait_for(reader.read(1), keep_alive + 5)
            waited = time.perf_counter() - t0
            if data:
                t.event("idle connection", "got data")
            else:
                t.event(
                    "idle connection",
                    f"closed by server within {keep_alive + 1} s"
                    if waited <= keep_alive + 1
                    else "closed late",
                )
        except TimeoutError:
            t.event("idle connection", "still open")
        finally:
            writer.close()

    await asyncio.gather(*(one() for _ in range(n)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--disconnects", type=int, default=500)
    ap.add_argument("--flood", type=int, default=100)
    ap.add_argument("--deadline", type=float, default=240, help="seconds; the abuse stops past it")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    port, keep_alive = _free_port(), 2
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DLLM_CACHE_API_KEY": KEY, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [
        sys.executable, "-c", "from dllm_cache.cli import app; app()", "serve", "--model", MODEL,
        "--port", str(port), "--max-batch-size", "4", "--max-queue", "16", "--keep-alive", str(keep_alive),
        "--device", "cpu",
    ]  # fmt: skip
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr: list[bytes] = []
    threading.Thread(target=lambda: stderr.extend(server.stderr), daemon=True).start()  # type: ignore[arg-type]
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < deadline and server.poll() is None, b"".join(stderr).decode()
            time.sleep(0.2)
        for _ in range(3):  # warm up: first generations allocate what later ones reuse
            httpx.post(url + "/v1/completions", json=_c(max_tokens=32), headers=AUTH, timeout=60)
        time.sleep(1)
        rss = {"baseline": _rss_mb(server.pid)}
        peak = [rss["baseline"]]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], _rss_mb(server.pid))
                time.sleep(0.02)

        threading.Thread(target=sample, daemon=True).start()
        stop, out = mp.Event(), mp.Queue()
        polite = mp.Process(target=_well_behaved, args=(url, stop, out))
        polite.start()
        t, t0 = Tally(), time.time()

        async def abuse() -> None:
            phases = {
                "sizes": _sizes(t, url),
                "encodings, types, paths, auth, routes": _bad_bodies(t, url),
                "malformed HTTP": _malformed_http(t, port),
                "disconnects": _disconnects(t, url, port, args.disconnects, args.seed),
                "flood": _flood(t, url, args.flood),
                "idle connections": _idle(t, port, 20, keep_alive),
            }
            for name, p in phases.items():
                remaining = args.deadline - (time.time() - t0)
                if remaining <= 0:
                    p.close()
                    t.event("skipped", "deadline")
                    continue
                start = time.time()
                await asyncio.wait_for(p, remaining)
                t.phases.append((name, start, time.time()))

        asyncio.run(abuse())
        abuse_s = time.time() - t0
        stop.set()
        polite_result = out.get(timeout=120)
        polite.join(timeout=10)
        deadline = time.time() + 60
        while (m := _metrics(url))["dllm_in_flight"] or m["dllm_queue_length"]:
            assert time.time() < deadline, f"not idle: {m}"
            time.sleep(0.2)
        time.sleep(3)  # let freed buffers go back
        m = _metrics(url)
        sampling.set()
        rss.update(peak=peak[0], after=_rss_mb(server.pid))
    finally:
        server.terminate()
        server.wait(timeout=30)
    log = b"".join(stderr).decode(errors="replace")
    tb = [ln for ln in log.splitlines() if "Traceback" in ln]
    if tb:
        print(log[-6000:], file=sys.stderr)
    health = polite_result["health"]
    lat = sorted(x for _, x in health)
    worst_by_phase = {
        name: round(1000 * max((x for at, x in health if a <= at <= b), default=0.0), 1)
        for name, a, b in t.phases
    }
    summary = {
        "abuse_seconds": round(abuse_s, 1),
        "codes": {k: dict(v) for k, v in sorted(t.codes.items())},
        "requests": sum(sum(v.values()) for v in t.codes.values()),
        "bad_responses": t.bad,
        "well_behaved": {
            "health_max_ms": round(1000 * lat[-1], 1),
            "health_p99_ms": round(1000 * lat[int(0.99 * len(lat))], 1),
            "health_median_ms": round(1000 * lat[len(lat) // 2], 1),
            "health_max_ms_by_phase": worst_by_phase,
            "health_requests": len(lat),
            "completion_max_s": round(max(polite_result["completion"]), 2),
            "completion_requests": len(polite_result["completion"]),
            "failures": polite_result["failures"],
        },
        "rss_mb": {k: round(v, 1) for k, v in rss.items()},
        "idle_metrics": {
            k: m[k] for k in ("dllm_in_flight", "dllm_queue_length", "dllm_requests_cancelled_total")
        },
        "server_tracebacks_logged": len(tb),
    }
    print("| kind | requests | answers |")
    print("| --- | --- | --- |")
    for kind, codes in summary["codes"].items():
        print(
            f"| {kind} | {sum(codes.values())} | {', '.join(f'{n} x {c}' for c, n in sorted(codes.items()))} |"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

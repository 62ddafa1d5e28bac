"""The OpenAI-compatible server, driven by the real `openai` client (and httpx, raw sockets) over
loopback; the second half faces it with hostile clients (issue 21)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
import uvicorn
from typer.testing import CliRunner

from dllm_cache.demo.random_checkpoint import write_random_checkpoint
from dllm_cache.engine import GenerationConfig, generate
from dllm_cache.methods import Method
from dllm_cache.models.loading import load
from dllm_cache.serve.app import create_app
from dllm_cache.serve.scheduler import Job, Scheduler
from dllm_cache.serve.server import server_config

GEN = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app, keep_alive_s: int = 5):
        self.port = _free_port()
        config = server_config(app, port=self.port, keep_alive_s=keep_alive_s, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[str, float]:
        return _metrics(self)

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """/metrics once nothing is queued or generated (or the timeout passed)."""
        deadline = time.time() + timeout
        while True:
            m = self.metrics()
            if (m["dllm_in_flight"] == 0 and m["dllm_queue_length"] == 0) or time.time() > deadline:
                return m
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def random_llada(tmp_path_factory):
    """The small random LLaDA the server tests serve."""
    path = write_random_checkpoint("llada", tmp_path_factory.mktemp("srv") / "m", n_layers=2, d_model=64)
    return load(path)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # many client threads share two cores with the server: spinning intra-op threads would starve them
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return random_llada(tmp_path_factory)


@pytest.fixture(scope="module")
def server(llm):
    s = _Server(create_app(llm, model_name="tiny", max_batch_size=4, max_queue=16, default_max_tokens=GEN))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def _metrics(server) -> dict[str, float]:
    text = httpx.get(server.url + "/metrics").text
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_completion_equals_generate(client, llm):
    r = client.completions.create(model="tiny", prompt="Tom has 3 apples.", max_tokens=GEN)
    expected = generate(llm, "Tom has 3 apples.", gen_length=GEN, chat=False)
    assert r.choices[0].text == expected.text
    assert r.usage.completion_tokens == len(expected.tokens[0])
    assert r.usage.prompt_tokens == len(
        llm.tokenizer("Tom has 3 apples.", add_special_tokens=False)["input_ids"]
    )


def test_chat_equals_generate_with_template(client, llm):
    r = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=GEN
    )
    assert r.choices[0].message.content == generate(llm, "What is 2 + 3?", gen_length=GEN).text
    assert r.choices[0].message.role == "assistant" and r.usage.total_tokens > 0


def test_cache_settings_through_extra_body(client, llm):
    r = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Count to 3"}],
        max_tokens=GEN,
        extra_body={
            "dllm": {"cache": "dllm-cache", "cache_args": {"prompt_interval": 1, "response_interval": 1}}
        },
    )
    assert r.choices[0].message.content == generate(llm, "Count to 3", gen_length=GEN).text


def test_streaming_chat_reassembles_the_answer(client, llm):
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hello"}],
        max_tokens=32,
        stream=True,
        extra_body={"dllm": {"block_length": 8}},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == generate(llm, "Hello", gen_length=32, block_length=8).text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) >= 2


def test_streaming_denoising_view(server):
    body = {
        "model": "tiny",
        "prompt": "abc",
        "max_tokens": 8,
        "stream": True,
        "dllm": {"stream_denoising": True},
    }
    canvases, done = [], False
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                obj = json.loads(line[6:])
                if "dllm" in obj:
                    canvases.append(obj["dllm"]["tokens"])
    assert done and len(canvases) == 8  # one canvas per step
    assert canvases[0].count("<mask>") == 7 and "<mask>" not in canvases[-1]


@pytest.mark.parametrize(
    "body,status,fragment",
    [
        ({"model": "nope", "prompt": "x"}, 404, "model 'nope' not found"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens must be positive"),
        ({"model": "tiny", "prompt": "x", "max_tokens": 100000}, 400, "exceeds the model's limit"),
        (
            {"model": "tiny", "prompt": "word " * 600, "max_tokens": 16},
            400,
            "exceeds the model's maximum sequence length",
        ),
        (
            {"model": "tiny", "prompt": "x", "temperature": -1},
            400,
            "temperature: Input should be greater than or equal to 0",
        ),
        ({"model": "tiny", "prompt": "x", "dllm": {"cache": "magic"}}, 400, "unknown cache policy 'magic'"),
        ({"model": "tiny", "prompt": ""}, 400, "prompt is empty"),
        ({"model": "tiny"}, 400, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, fragment):
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    assert r.status_code == status
    assert fragment in r.json()["error"]["message"]


def test_chat_errors(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400 and "messages must not be empty" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "tiny"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_concurrent_requests_are_batched_and_each_correct(client, server, llm):
    prompts = ["one", "two two", "three three three", "four"]
    before = _metrics(server)
    with ThreadPoolExecutor(4) as pool:
        answers = list(
            pool.map(lambda p: client.completions.create(model="tiny", prompt=p, max_tokens=GEN), prompts)
        )
    after = _metrics(server)
    for p, a in zip(prompts, answers, strict=True):
        assert a.choices[0].text == generate(llm, p, gen_length=GEN, chat=False).text
    served = after["dllm_batched_requests_total"] - before["dllm_batched_requests_total"]
    batches = after["dllm_batches_total"] - before["dllm_batches_total"]
    assert served == 4 and batches < 4


def test_disconnecting_stream_frees_its_slot(server):
    body = {
        "model": "tiny",
        "prompt": "go",
        "max_tokens": 256,
        "stream": True,
        "dllm": {"stream_denoising": True, "block_length": 256},
    }
    before = _metrics(server)["dllm_requests_cancelled_total"]
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leave after the first event
    deadline = time.time() + 20
    while time.time() < deadline:
        m = _metrics(server)
        if m["dllm_requests_cancelled_total"] > before and m["dllm_in_flight"] == 0:
            break
        time.sleep(0.05)
    m = _metrics(server)
    assert m["dllm_requests_cancelled_total"] == before + 1 and m["dllm_in_flight"] == 0


def test_api_key_and_full_queue(llm):
    s = _Server(create_app(llm, model_name="tiny", max_queue=1, api_key="sekret", default_max_tokens=GEN))
    try:
        bad = openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="sekret", max_retries=0)
        long_body = {"model": "tiny", "prompt": "go", "max_tokens": 256, "dllm": {"block_length": 256}}
        headers = {"authorization": "Bearer sekret"}
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                httpx.post, s.url + "/v1/completions", json=long_body, headers=headers, timeout=120
            )
            deadline = time.time() + 10
            while _metrics(s).get("dllm_in_flight", 0) + _metrics(s).get("dllm_queue_length", 0) < 1:
                assert time.time() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as err:
                good.completions.create(model="tiny", prompt="x", max_tokens=GEN)
            assert err.value.status_code == 503 and err.value.response.headers["retry-after"] == "1"
            assert first.result().status_code == 200
    finally:
        s.stop()


def test_stop_sequences_cut_the_answer(client, llm):
    full = generate(llm, "Tom has 3 apples.", gen_length=GEN, chat=False).text
    assert len(full) > 4
    stop = full[2:4]
    r = client.completions.create(model="tiny", prompt="Tom has 3 apples.", max_tokens=GEN, stop=[stop])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="only n=1"):
        client.completions.create(model="tiny", prompt="x", max_tokens=GEN, n=2)


# --- hostile clients (issue 21): size, disconnects, stop strings, validation, paths, auth, idle ---

LONG = {"model": "tiny", "prompt": "go", "max_tokens": 256, "dllm": {"block_length": 256}}


def _is_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_a_20mb_body_is_refused_at_once_and_health_stays_fast(server):
    big = json.dumps({"model": "tiny", "prompt": "x" * 20_000_000}).encode()
    results: dict = {}

    def chunks():
        for i in range(0, len(big), 1 << 16):  # no content-length: the limit holds while reading
            yield big[i : i + (1 << 16)]

    def send(name, content):
        t = time.perf_counter()
        r = httpx.post(server.url + "/v1/completions", content=content, timeout=30)
        results[name] = (r, time.perf_counter() - t)

    well_behaved = httpx.Client(base_url=server.url, timeout=5)
    assert well_behaved.get("/health").status_code == 200  # connected before the abuse starts
    threads = [threading.Thread(target=send, args=a) for a in (("sized", big), ("chunked", chunks()))]
    for t in threads:
        t.start()
    health = []
    while any(t.is_alive() for t in threads):
        t0 = time.perf_counter()
        assert well_behaved.get("/health").status_code == 200
        health.append(time.perf_counter() - t0)
        time.sleep(0.01)
    for t in threads:
        t.join()
    for r, seconds in results.values():
        assert _is_openai_error(r, 413)["code"] == "request_too_large"
        assert seconds < 1.0
    # The bar is 100 ms (met in benchmarks/server_abuse.py, server in its own process); here
    # client threads share the server's process and a loaded 2-core box, so the worst case gets
    # headroom. Before the fix /health stalled for the whole 18-24 s of tokenising.
    assert sorted(health)[len(health) // 2] < 0.1 and max(health) < 0.5, health


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "x" * 200_000}),
        ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "a"}] * 12_000}),
    ],
)
def test_prompts_that_cannot_fit_are_refused_before_tokenising(server, path, body):
    t = time.perf_counter()
    r = httpx.post(server.url + path, json=body, timeout=30)
    err = _is_openai_error(r, 400)
    assert err["code"] == "context_length_exceeded" and "characters" in err["message"]  # not tokenised
    assert time.perf_counter() - t < 3.0


def test_streams_closed_before_done_leave_no_slot_behind(server):
    """Many streams leaving right after their answer text, before [DONE]: in_flight returns to 0
    (never below) and the queue bound still holds."""
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 32, "stream": True, "dllm": {"block_length": 8}}

    def leave_early(_):
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and '"text": "' in line and '"text": ""' not in line:
                    return

    for _ in range(2):
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(leave_early, range(16)))
        m = server.wait_idle()
        assert m["dllm_in_flight"] == 0 and m["dllm_queue_length"] == 0


def test_a_late_cancel_never_frees_a_slot_twice(llm):
    """The race of issue 21: the worker has finished (and freed the slot) but the answer has not reached
    the event loop yet when the client leaves. in_flight must stay 0, not go to -1."""
    scheduler = Scheduler(llm, max_batch_size=1, max_queue=2)
    loop = asyncio.new_event_loop()  # never run: the result stays undelivered
    try:
        config = GenerationConfig(gen_length=8, block_length=8, chat=False)
        job = Job([5, 6, 7], config, Method(), loop, loop.create_future())
        scheduler.submit(job)
        deadline = time.time() + 30
        while scheduler.metrics.batches == 0:
            assert time.time() < deadline
            time.sleep(0.01)
        assert scheduler.in_flight == 0 and not job.future.done()
        scheduler.cancel(job)
        scheduler.cancel(job)
        assert scheduler.in_flight == 0
    finally:
        scheduler.close()
        loop.close()


def test_non_streaming_client_that_leaves_is_cancelled(llm):
    s = _Server(create_app(llm, model_name="tiny", max_batch_size=1, max_queue=2, default_max_tokens=GEN))
    try:
        before = s.metrics()

        def give_up(_):
            with pytest.raises(httpx.TimeoutException):
                httpx.post(s.url + "/v1/completions", json=LONG, timeout=0.3)

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(give_up, range(2)))
        m = s.wait_idle(timeout=3)
        assert m["dllm_in_flight"] == 0 and m["dllm_queue_length"] == 0
        assert m["dllm_requests_cancelled_total"] - before["dllm_requests_cancelled_total"] == 2
        r = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "x"}, timeout=60)
        assert r.status_code == 200  # the abandoned requests no longer hold the queue
    finally:
        s.stop()


def test_streaming_honours_stop_like_non_streaming(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    args = {
        "model": "tiny",
        "prompt": "Tom has 3 apples.",
        "max_tokens": 32,
        "extra_body": {"dllm": {"block_length": 8}},
    }
    full = client.completions.create(**args).choices[0].text
    assert len(full) > 12
    for stop in (full[3:5], full[9:12]):
        want = client.completions.create(**args, stop=stop).choices[0]
        chunks = list(client.completions.create(**args, stop=stop, stream=True))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == want.text == full[: full.index(stop)]
        assert chunks[-1].choices[0].finish_reason == want.finish_reason == "stop"


def _completion(prompt="hi", **kw):
    return {"model": "tiny", "prompt": prompt, **kw}


@pytest.mark.parametrize(
    "content,fragment",
    [
        (_completion(seed=2**70), "seed"),
        (_completion(dllm={"preset": "none+reference:temperature=1"}), "'temperature' field"),
        (_completion(dllm={"preset": "none+reference:gen_length=8"}), "'max_tokens' field"),
        (_completion(dllm={"preset": 'none+threshold:threshold="abc"'}), "threshold"),
        (_completion(temperature=1e308), "temperature"),
        (_completion(max_tokens=True), "max_tokens: Input should be a valid integer"),
        (_completion(dllm={"stepz": 8}), "dllm.stepz: unknown field"),
        (_completion(dllm={"cache": "dkv", "cache_args": {"refresh_interval": 1e308}}), "refresh_interval"),
        (_completion(dllm={"steps": 3, "block_length": 8}), "not divisible"),
        (_completion(stream=True, dllm={"steps": 3, "block_length": 8}), "not divisible"),
        (_completion(stream=True, seed=2**70), "seed"),
        ('{"model": "tiny", "prompt": "\\ud800"}', "lone surrogate"),
        ('{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}', "lone surrogate"),
        ('{"model": "tiny", "prompt": "hi", "temperature": NaN}', "NaN"),
        ('{"model": "tiny", "prompt": "hi", "temperature": Infinity}', "Infinity"),
        ('{"model": "tiny", "prompt": "hi", "x": ' + "[" * 1000 + "]" * 1000 + "}", "nested deeper"),
        (b'{"model": "tiny", "prompt": "\xff"}', "not valid UTF-8"),
    ],
)
def test_invalid_requests_get_400_in_openai_shape(server, content, fragment):
    raw = content if isinstance(content, str | bytes) else json.dumps(content)
    path = "/v1/chat/completions" if "messages" in str(raw) else "/v1/completions"
    r = httpx.post(server.url + path, content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert fragment in _is_openai_error(r, 400)["message"]


def test_unknown_routes_and_methods_in_openai_shape(server):
    assert _is_openai_error(httpx.get(server.url + "/v1/nope"), 404)["code"] == "not_found"
    assert _is_openai_error(httpx.get(server.url + "/v1/completions"), 405)["code"] == "method_not_allowed"


@pytest.mark.parametrize(
    "spec",
    [
        'none+guided:guide_model="/etc"',
        'none+guided:guide_model="/no/such/dir"',
        "none+guided:guide_model=../../etc",
        'none+guided:guide_model="~"',
    ],
)
def test_a_client_cannot_name_a_path(server, spec):
    r = httpx.post(server.url + "/v1/completions", json=_completion(dllm={"preset": spec}), timeout=30)
    msg = _is_openai_error(r, 400)["message"]
    assert "is not offered by this server (choose: tiny-ar" in msg
    assert "config.json" not in msg and "not found" not in msg  # nothing learnt about the filesystem


def test_guide_models_from_the_server_list_are_accepted(server):
    # tiny-ar is offered; with this random model it then fails on vocabulary, not on the name
    r = httpx.post(server.url + "/v1/completions", json=_completion(dllm={"preset": "guided"}), timeout=60)
    assert "does not share the vocabulary" in _is_openai_error(r, 400)["message"]


def test_401_names_the_scheme(llm):
    s = _Server(create_app(llm, model_name="tiny", api_key="sekret", default_max_tokens=GEN))
    try:
        r = httpx.get(s.url + "/v1/models", headers={"authorization": "Bearer wrong"})
        assert _is_openai_error(r, 401)["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert httpx.get(s.url + "/v1/models", headers={"authorization": "Bearer sekret"}).status_code == 200
    finally:
        s.stop()


def test_malformed_http_is_refused_in_openai_shape(server):
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(10)
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    assert json.loads(body)["error"]["code"] == "invalid_http"


def test_idle_connections_are_closed(llm):
    s = _Server(create_app(llm, model_name="tiny", default_max_tokens=GEN), keep_alive_s=1)
    try:
        with socket.create_connection(("127.0.0.1", s.port)) as sock:
            sock.settimeout(10)
            t = time.perf_counter()
            assert sock.recv(1) == b""  # closed by the server, never a request sent
            assert 0.5 < time.perf_counter() - t < 5
    finally:
        s.stop()


@pytest.mark.parametrize("source", ["file", "env"])
def test_serve_takes_the_api_key_from_a_file_or_the_environment(tmp_path, monkeypatch, source):
    from dllm_cache.cli import app as cli

    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.setdefault("app", self.config.app))
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    args, env = ["serve", "--model", "tiny-llada", "--device", "cpu"], {}
    if source == "file":
        args += ["--api-key-file", str(key_file)]
    else:
        env["DLLM_CACHE_API_KEY"] = "from-env"
    result = CliRunner().invoke(cli, args, env=env)
    assert result.exit_code == 0, result.output
    from starlette.testclient import TestClient

    with TestClient(seen["app"]) as tc:
        assert tc.get("/v1/models").status_code == 401
        key = "from-file" if source == "file" else "from-env"
        assert tc.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200

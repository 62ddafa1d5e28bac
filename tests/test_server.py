"""The OpenAI-compatible server, driven by the real `openai` client over loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from dllm_cache.demo.random_checkpoint import write_random_checkpoint
from dllm_cache.engine import generate
from dllm_cache.models.loading import load
from dllm_cache.serve.app import create_app

GEN = 16


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    def __init__(self, app):
        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            if time.time() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = write_random_checkpoint("llada", tmp_path_factory.mktemp("srv") / "m", n_layers=2, d_model=64)
    return load(path)


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

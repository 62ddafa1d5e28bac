"""OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (+ streaming),
/health, /metrics.

dLLM settings ride in an extension object `dllm` (send it with the OpenAI client's `extra_body`):
`{"steps", "block_length", "cache", "cache_args", "decoder", "threshold", "preset", "stream_denoising"}`.
With `stream_denoising: true` a stream also carries every step's partially unmasked canvas.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from dllm_cache.engine import GenerationConfig
from dllm_cache.errors import DllmCacheError
from dllm_cache.methods import Method, parse_method
from dllm_cache.models.loading import DLLM
from dllm_cache.models.tokenizer import encode_prompt
from dllm_cache.serve.scheduler import Job, JobResult, QueueFull, Scheduler


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


class DllmOptions(BaseModel):
    steps: int | None = None
    block_length: int | None = None
    cache: str | None = None
    cache_args: dict[str, Any] = Field(default_factory=dict)
    decoder: str | None = None
    threshold: float | None = None
    preset: str | None = None
    stream_denoising: bool = False


class _Common(BaseModel):
    model: str
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None
    dllm: DllmOptions = Field(default_factory=DllmOptions)


class CompletionRequest(_Common):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage]


def _error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def create_app(
    llm: DLLM,
    model_name: str = "tiny-llada",
    method: Method | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    default_max_tokens: int = 128,
) -> FastAPI:
    scheduler = Scheduler(llm, max_batch_size=max_batch_size, max_queue=max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="dllm-cache", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = scheduler
    default_method = method or Method()
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        scheduler.metrics.errors += 1
        return JSONResponse(_error_body(e), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, e: RequestValidationError) -> JSONResponse:
        scheduler.metrics.errors += 1
        errs = e.errors()
        first = errs[0] if errs else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(_error_body(APIError(400, "request body is not valid JSON")), status_code=400)
        loc = ".".join(str(x) for x in first.get("loc", ())[1:])
        msg = (
            f"{loc}: {first.get('msg', 'invalid value')}" if loc else str(first.get("msg", "invalid request"))
        )
        return JSONResponse(_error_body(APIError(400, msg, param=loc or None)), status_code=400)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                scheduler.metrics.errors += 1
                body = _error_body(
                    APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
                )
                return JSONResponse(body, status_code=401)
        return await call_next(request)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model": model_name}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> str:
        return scheduler.metrics.prometheus(len(scheduler.pending), scheduler.in_flight)

    @app.get("/v1/models")
    def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "dllm-cache"}],
        }

    def _prepare(req: _Common, prompt_ids: list[int]) -> tuple[GenerationConfig, Method]:
        if req.model != model_name:
            raise APIError(
                404,
                f"model {req.model!r} not found (this server has {model_name!r})",
                param="model",
                code="model_not_found",
            )
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens")
        limit = llm.config.max_seq_len
        if max_tokens > limit:
            raise APIError(
                400, f"max_tokens {max_tokens} exceeds the model's limit {limit}", param="max_tokens"
            )
        if len(prompt_ids) + max_tokens > limit:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                f"model's maximum sequence length {limit}",
                param="messages",
                code="context_length_exceeded",
            )
        if req.temperature < 0:
            raise APIError(400, f"temperature must be >= 0, got {req.temperature}", param="temperature")
        if req.top_p is not None and not 0 < req.top_p <= 1:
            raise APIError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
        opts = req.dllm
        try:
            m = (
                parse_method(opts.preset)
                if opts.preset
                else Method(
                    default_method.cache, dict(default_method.cache_args), dict(default_method.overrides)
                )
            )
            if opts.cache is not None:
                m = Method(opts.cache, dict(opts.cache_args), m.overrides)
            else:
                m.cache_args.update(opts.cache_args)
            m.policy()
        except DllmCacheError as e:
            raise APIError(400, str(e), param="dllm") from None
        overrides = dict(m.overrides)
        for k in ("decoder", "threshold", "block_length"):
            if getattr(opts, k) is not None:
                overrides[k] = getattr(opts, k)
        # the answer length must split into blocks: round up to a whole number of blocks, cut later
        block = overrides.get("block_length") or (
            max_tokens if llm.config.shift_logits else min(32, max_tokens)
        )
        overrides["block_length"] = block
        gen_length = -(-max_tokens // block) * block
        steps = opts.steps if opts.steps is not None else gen_length
        config = GenerationConfig(
            gen_length=gen_length,
            steps=steps,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed or 0,
            **overrides,
        )
        return config, m

    async def _run(request: Request, req: _Common, prompt_ids: list[int], kind: str):
        config, m = _prepare(req, prompt_ids)
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
        loop = asyncio.get_running_loop()
        job = Job(
            prompt_ids,
            config,
            m,
            loop,
            loop.create_future(),
            asyncio.Queue() if req.stream else None,
            req.dllm.stream_denoising,
            max_tokens=max_tokens,
        )
        try:
            scheduler.submit(job)
        except QueueFull:
            raise APIError(
                503,
                "server busy: request queue is full",
                "server_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if not req.stream:
            try:
                result: JobResult = await job.future
            except DllmCacheError as e:
                raise APIError(400, str(e)) from None
            text, finish = _finish(result, max_tokens, stops)
            return _response(kind, rid, model_name, text, finish, result, max_tokens)
        return StreamingResponse(_stream(job, kind, rid, max_tokens, stops), media_type="text/event-stream")

    async def _stream(job: Job, kind: str, rid: str, max_tokens: int, stops: list[str]):
        done = False
        sent = ""
        try:
            if kind == "chat":
                yield _sse(_chunk(kind, rid, model_name, {"role": "assistant", "content": ""}, None))
            while True:
                what, payload = await job.events.get()
                if what == "canvas":
                    yield _sse(
                        {
                            **_chunk(kind, rid, model_name, {"content": ""} if kind == "chat" else "", None),
                            "dllm": payload,
                        }
                    )
                elif what == "text":
                    candidate = sent + payload
                    cut = _cut(candidate, stops)
                    if len(cut) > len(sent):
                        delta = cut[len(sent) :]
                        sent = cut
                        yield _sse(
                            _chunk(
                                kind, rid, model_name, {"content": delta} if kind == "chat" else delta, None
                            )
                        )
                elif what == "error":
                    yield _sse(_error_body(APIError(500, str(payload), "server_error")))
                    break
                elif what == "done":
                    text, finish = _finish(payload, max_tokens, stops)
                    if len(text) > len(sent) and text.startswith(sent):
                        delta = text[len(sent) :]
                        yield _sse(
                            _chunk(
                                kind, rid, model_name, {"content": delta} if kind == "chat" else delta, None
                            )
                        )
                    final = _chunk(kind, rid, model_name, {} if kind == "chat" else "", finish)
                    final["usage"] = _usage(payload, max_tokens)
                    yield _sse(final)
                    break
            yield "data: [DONE]\n\n"
            done = True
        finally:
            if not done:
                scheduler.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request, req: CompletionRequest):
        prompt = (
            req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if len(req.prompt) == 1 else None)
        )
        if prompt is None:
            raise APIError(400, "prompt must be a string or a list with one string", param="prompt")
        if not prompt.strip():
            raise APIError(400, "prompt is empty", param="prompt")
        ids = llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        return await _run(request, req, ids, "text")

    @app.post("/v1/chat/completions")
    async def chat(request: Request, req: ChatRequest):
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        msgs = [m.model_dump() for m in req.messages]
        tok = llm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = encode_prompt(tok, "\n".join(m["content"] for m in msgs), chat=False)
        return await _run(request, req, ids, "chat")

    return app


def _cut(text: str, stops: list[str]) -> str:
    idx = [text.find(s) for s in stops if s and s in text]
    return text[: min(idx)] if idx else text


def _finish(result: JobResult, max_tokens: int, stops: list[str]) -> tuple[str, str]:
    """The answer text cut at the first stop string, and OpenAI's finish_reason."""
    finish = "length" if len(result.tokens) >= max_tokens else "stop"
    cut = _cut(result.text, stops)
    return cut, "stop" if cut != result.text else finish


def _usage(result: JobResult, max_tokens: int) -> dict:
    completion = min(len(result.tokens), max_tokens)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }


def _chunk(kind: str, rid: str, model: str, delta: Any, finish: str | None) -> dict:
    if kind == "chat":
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}


def _response(
    kind: str, rid: str, model: str, text: str, finish: str, result: JobResult, max_tokens: int
) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return {
        "id": rid,
        "object": obj,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(result, max_tokens),
        "dllm": {"stats": result.stats},
    }


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

"""OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions (+ streaming),
/health, /metrics.

dLLM settings ride in an extension object `dllm` (send it with the OpenAI client's `extra_body`):
`{"steps", "block_length", "cache", "cache_args", "decoder", "threshold", "preset", "stream_denoising"}`.
With `stream_denoising: true` a stream also carries every step's partially unmasked canvas.

Hostile clients are expected. Every refusal is OpenAI's error object (`{"error": {"message", "type",
"param", "code"}}`), never plain text: a body over the size limit gets 413 while it is still being read
(the event loop only copies bytes); parsing, validation and tokenising run on worker threads, after a
cheap character bound has refused prompts that cannot fit the context; a request is validated in full
(streams included) before it is answered 200; a client names no filesystem path (guide models come from
the server's own list); a client that leaves, streaming or not, is cancelled and frees its slot.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import time
import typing
import uuid
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send

from dllm_cache.cache import POLICIES
from dllm_cache.engine import GenerationConfig
from dllm_cache.errors import DllmCacheError
from dllm_cache.methods import Method, parse_method
from dllm_cache.models.loading import CHECKPOINTS_DIR, DLLM
from dllm_cache.models.tokenizer import encode_prompt
from dllm_cache.serve.scheduler import Job, JobResult, QueueFull, Scheduler

MAX_JSON_DEPTH = 32  # the deepest legitimate request (cache_args inside dllm) is 3 levels down
MAX_STOPS = 4  # as OpenAI
DISCONNECT_POLL_S = 0.1
# A body over the limit is read on (and dropped) up to this much / this long, so that an ordinary
# client, which sends its whole body before it reads, sees the 413 instead of a reset connection.
DRAIN_BYTES, DRAIN_S = 64 << 20, 1.0


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


# Strict types: `true` is not an integer, "1" is not a number, NaN and Infinity are no temperature.
Finite = Annotated[float, Field(allow_inf_nan=False)]
Positive = Annotated[int, Field(ge=1)]


class DllmOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")  # a misspelt key must not pass silently

    steps: Positive | None = None
    block_length: Positive | None = None
    cache: str | None = None
    cache_args: dict[str, Any] = Field(default_factory=dict)
    decoder: str | None = None
    threshold: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1)] | None = None
    preset: str | None = None
    stream_denoising: bool = False


class _Common(BaseModel):
    # Unknown top-level keys are ignored: OpenAI clients send fields (logprobs, penalties) we lack.
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: Annotated[float, Field(allow_inf_nan=False, ge=0, le=2)] = 0.0
    top_p: Annotated[float, Field(allow_inf_nan=False, gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), lt=2**63)] | None = None  # OpenAI's: a signed int64
    stop: str | Annotated[list[str], Field(max_length=MAX_STOPS)] | None = None
    n: int = 1
    stream: bool = False
    user: str | None = None
    dllm: DllmOptions = Field(default_factory=DllmOptions)


class CompletionRequest(_Common):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatRequest(_Common):
    messages: list[ChatMessage]


# Method-spec arguments that a request field already sets (the spec must not set them twice), and
# GenerationConfig fields that are the server's business.
_SET_BY_REQUEST = {
    "gen_length": "max_tokens",
    "steps": "dllm.steps",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
}
# graphs, compile: capture memory and compile time are the server's call
_SERVER_ONLY = {"chat", "record_steps", "graphs", "compile"}
_CONFIG_TYPES = typing.get_type_hints(GenerationConfig)


def _error_body(e: APIError) -> dict:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(_error_body(e), status_code=e.status, headers=e.headers)


def embedded_guide_models() -> dict[str, str]:
    """The checkpoints shipped inside the package, by name -> directory (a client may name these)."""
    if not CHECKPOINTS_DIR.is_dir():
        return {}
    return {p.name: str(p) for p in sorted(CHECKPOINTS_DIR.iterdir()) if (p / "config.json").is_file()}


class _Auth:
    """Bearer-key check for /v1/ as plain ASGI (no BaseHTTPMiddleware: it would hide disconnects)."""

    def __init__(self, app: ASGIApp, api_key: str, on_refuse: typing.Callable[[], None]) -> None:
        self.app, self.expected, self.on_refuse = app, f"Bearer {api_key}".encode(), on_refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                self.on_refuse()
                e = APIError(401, "invalid API key", "authentication_error", code="invalid_api_key")
                e.headers = {"WWW-Authenticate": 'Bearer realm="dllm-cache"'}
                await _error_response(e)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def create_app(
    llm: DLLM,
    model_name: str = "tiny-llada",
    method: Method | None = None,
    max_batch_size: int = 8,
    max_queue: int = 64,
    api_key: str | None = None,
    default_max_tokens: int = 128,
    max_body_bytes: int | None = None,
    guide_models: dict[str, str] | None = None,
) -> FastAPI:
    """`guide_models`: the AR guide checkpoints a request may name (name -> directory); default: those
    shipped inside the package. A request never names a directory itself. `max_body_bytes`: default,
    what the longest prompt that can fit takes in JSON (every character escaped) plus 1 MiB."""
    scheduler = Scheduler(llm, max_batch_size=max_batch_size, max_queue=max_queue)
    guides = embedded_guide_models() if guide_models is None else dict(guide_models)
    limit = llm.config.max_seq_len
    # A token is at most this many characters, so a longer prompt cannot fit; refusing it costs
    # nothing, where tokenising it first would cost seconds. (x2: normalisation may merge characters.)
    max_token_chars = max((len(t) for t in llm.tokenizer.get_vocab()), default=1)
    max_prompt_chars = 2 * limit * max(max_token_chars, 1)
    if max_body_bytes is None:
        max_body_bytes = 12 * max_prompt_chars + (1 << 20)  # "\ud83d\ude00" is 12 bytes, 1 character

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        scheduler.close()

    app = FastAPI(title="dllm-cache", version="0.1.0", lifespan=lifespan)
    app.state.scheduler = scheduler
    default_method = method or Method()
    created = int(time.time())

    def _count_error() -> None:
        scheduler.metrics.errors += 1

    if api_key:
        app.add_middleware(_Auth, api_key=api_key, on_refuse=_count_error)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        _count_error()
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        _count_error()
        if e.status_code == 404:
            msg, code = f"no such endpoint: {request.method} {request.url.path}", "not_found"
        elif e.status_code == 405:
            msg, code = f"method {request.method} is not allowed on {request.url.path}", "method_not_allowed"
        else:
            msg, code = str(e.detail), None
        return _error_response(APIError(e.status_code, msg, code=code, headers=e.headers))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, e: Exception) -> JSONResponse:
        _count_error()
        return _error_response(APIError(500, f"internal error: {type(e).__name__}", "server_error"))

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

    async def _read_body(request: Request) -> bytes:
        """The body, refused with 413 as soon as it is known to be too large (header or bytes read)."""
        too_large = APIError(
            413,
            f"request body exceeds this server's limit of {max_body_bytes} bytes",
            code="request_too_large",
            headers={"Connection": "close"},
        )
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > DRAIN_BYTES):
            raise too_large  # at once: a client still sending may see only the connection close
        body, received, t0 = bytearray(), 0, time.monotonic()
        async for chunk in request.stream():
            received += len(chunk)
            if received <= max_body_bytes:
                body += chunk
            elif received > DRAIN_BYTES or time.monotonic() - t0 > DRAIN_S:
                raise too_large
            else:  # keep nothing, but read on so that the client is not cut off mid-send
                body.clear()
        if received > max_body_bytes:
            raise too_large
        return bytes(body)

    def _method_for(opts: DllmOptions) -> Method:
        """The request's method: the server default, or the client's preset/spec with every argument
        checked (types, no request-field clashes, no paths); guide models from the server's list."""
        try:
            if opts.preset:
                m = parse_method(opts.preset)
                _check_spec_overrides(m.overrides)
                if "guide_model" in m.overrides:
                    m.overrides["guide_model"] = _guide_dir(m.overrides["guide_model"], guides)
            else:
                m = Method(
                    default_method.cache, dict(default_method.cache_args), dict(default_method.overrides)
                )
            if opts.cache is not None:
                m = Method(opts.cache, dict(opts.cache_args), m.overrides)
            else:
                m.cache_args.update(opts.cache_args)
            _check_cache_args(m)
            m.policy()
        except DllmCacheError as e:
            raise APIError(400, str(e), param="dllm") from None
        return m

    def _check_model(req: _Common) -> None:
        if req.model != model_name:
            raise APIError(
                404,
                f"model {req.model!r} not found (this server has {model_name!r})",
                param="model",
                code="model_not_found",
            )

    def _prepare(req: _Common, prompt_ids: list[int]) -> tuple[GenerationConfig, Method, int]:
        if req.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        max_tokens = req.max_tokens if req.max_tokens is not None else default_max_tokens
        if max_tokens <= 0:
            raise APIError(400, f"max_tokens must be positive, got {max_tokens}", param="max_tokens")
        if max_tokens > limit:
            raise APIError(
                400, f"max_tokens {max_tokens} exceeds the model's limit {limit}", param="max_tokens"
            )
        opts = req.dllm
        m = _method_for(opts)
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
        if len(prompt_ids) + gen_length > limit:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}"
                + (f", {gen_length} in whole blocks of {block}" if gen_length != max_tokens else "")
                + f") exceeds the model's maximum sequence length {limit}",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        steps = opts.steps if opts.steps is not None else gen_length
        if steps > gen_length:
            raise APIError(
                400, f"dllm.steps {steps} exceeds the answer length {gen_length}", param="dllm.steps"
            )
        config = GenerationConfig(
            gen_length=gen_length,
            steps=steps,
            temperature=req.temperature,
            top_p=req.top_p,
            seed=req.seed or 0,
            **overrides,
        )
        return config, m, max_tokens

    def _too_long(chars: int, param: str) -> APIError:
        return APIError(
            400,
            f"prompt has {chars} characters, more than the {limit} tokens this model takes can hold "
            f"(at most {max_prompt_chars} characters)",
            param=param,
            code="context_length_exceeded",
        )

    def _tokenize_completion(req: CompletionRequest) -> list[int]:
        prompt = (
            req.prompt if isinstance(req.prompt, str) else (req.prompt[0] if len(req.prompt) == 1 else None)
        )
        if prompt is None:
            raise APIError(400, "prompt must be a string or a list with one string", param="prompt")
        if not prompt.strip():
            raise APIError(400, "prompt is empty", param="prompt")
        if len(prompt) > max_prompt_chars:
            raise _too_long(len(prompt), "prompt")
        return llm.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    def _tokenize_chat(req: ChatRequest) -> list[int]:
        if not req.messages:
            raise APIError(400, "messages must not be empty", param="messages")
        chars = sum(len(m.content) for m in req.messages) + len(req.messages)  # + one separator each
        if chars > max_prompt_chars:
            raise _too_long(chars, "messages")
        msgs = [m.model_dump() for m in req.messages]
        tok = llm.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            if len(text) > max_prompt_chars:
                raise _too_long(len(text), "messages")
            return tok(text, add_special_tokens=False)["input_ids"]
        return encode_prompt(tok, "\n".join(m["content"] for m in msgs), chat=False)

    def _build(body: bytes, kind: str) -> tuple[_Common, list[int], GenerationConfig, Method, int]:
        """Body bytes -> a validated request, its prompt ids and settings (runs on a worker thread)."""
        obj = _load_json(body)
        messages = obj.get("messages")
        if isinstance(messages, list) and len(messages) > max_prompt_chars:  # before validating each
            raise _too_long(len(messages), "messages")
        req = _validate(obj, ChatRequest if kind == "chat" else CompletionRequest)
        _check_model(req)  # before tokenising anything
        ids = _tokenize_chat(req) if isinstance(req, ChatRequest) else _tokenize_completion(req)
        config, m, max_tokens = _prepare(req, ids)
        return req, ids, config, m, max_tokens

    async def _wait_or_leave(request: Request, job: Job, ready: typing.Awaitable) -> bool:
        """Wait for `ready`; False (and the job cancelled, its slot freed) if the client leaves first."""
        task = asyncio.ensure_future(ready)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    return True
                if await request.is_disconnected():
                    scheduler.cancel(job)
                    return False
        except asyncio.CancelledError:  # the server dropped the request (shutdown, lost connection)
            scheduler.cancel(job)
            raise
        finally:
            if task.done() and not task.cancelled():
                task.exception()  # read here; the caller looks at job.future itself
            task.cancel()

    async def _run(request: Request, kind: str) -> Any:
        try:
            body = await _read_body(request)
        except ClientDisconnect:
            return Response(status_code=499)  # gone mid-body: nobody to answer
        req, ids, config, m, max_tokens = await run_in_threadpool(_build, body, kind)
        loop = asyncio.get_running_loop()
        job = Job(
            ids,
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
            if not await _wait_or_leave(request, job, asyncio.shield(job.future)):
                return Response(status_code=499)  # nobody is listening
            result: JobResult = _result_or_error(job)
            text, finish = _finish(result, max_tokens, stops)
            return _response(kind, rid, model_name, text, finish, result, max_tokens)
        # Answer 200 only once the engine has accepted the settings (its first step ran), so that a
        # settings error is a 400 here as without streaming, not an error inside a 200 stream.
        assert job.events is not None
        first = asyncio.ensure_future(job.events.get())
        if not await _wait_or_leave(request, job, first):
            return Response(status_code=499)
        what, payload = first.result()
        if what == "error":
            raise _api_error_for(payload)
        stream = _stream(job, (what, payload), kind, rid, max_tokens, stops)
        return StreamingResponse(stream, media_type="text/event-stream")

    def _result_or_error(job: Job) -> JobResult:
        exc = job.future.exception()
        if exc is not None:
            raise _api_error_for(exc)
        return job.future.result()

    async def _stream(
        job: Job, first: tuple[str, Any], kind: str, rid: str, max_tokens: int, stops: list[str]
    ):
        def content(delta: str) -> Any:
            return {"content": delta} if kind == "chat" else delta

        finished = False
        full, sent = "", ""  # the answer text seen so far; what of it went out (never past a stop)
        event = first
        try:
            if kind == "chat":
                yield _sse(_chunk(kind, rid, model_name, {"role": "assistant", "content": ""}, None))
            while True:
                what, payload = event
                if what == "canvas":
                    yield _sse({**_chunk(kind, rid, model_name, content(""), None), "dllm": payload})
                elif what == "text":
                    full += payload
                    cut = _cut(full, stops)
                    if cut != full:  # a stop string: the answer ends here, as without streaming
                        if len(cut) > len(sent):
                            yield _sse(_chunk(kind, rid, model_name, content(cut[len(sent) :]), None))
                        scheduler.cancel(job, client_left=False)
                        yield _sse(_chunk(kind, rid, model_name, {} if kind == "chat" else "", "stop"))
                        break
                    safe = full[: len(full) - _held_back(full, stops)]  # may still become a stop
                    if len(safe) > len(sent):
                        yield _sse(_chunk(kind, rid, model_name, content(safe[len(sent) :]), None))
                        sent = safe
                elif what == "error":
                    yield _sse(_error_body(_api_error_for(payload)))
                    break
                elif what == "done":
                    text, finish = _finish(payload, max_tokens, stops)
                    if len(text) > len(sent) and text.startswith(sent):
                        yield _sse(_chunk(kind, rid, model_name, content(text[len(sent) :]), None))
                    final = _chunk(kind, rid, model_name, {} if kind == "chat" else "", finish)
                    final["usage"] = _usage(payload, max_tokens)
                    yield _sse(final)
                    break
                event = await job.events.get()  # type: ignore[union-attr]
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                scheduler.cancel(job)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _run(request, "text")

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _run(request, "chat")

    return app


def _api_error_for(exc: BaseException) -> APIError:
    """A generation failure as the client sees it: the user's mistake (400) or ours (500, unnamed)."""
    if isinstance(exc, DllmCacheError):
        return APIError(400, str(exc))
    return APIError(500, f"generation failed: {type(exc).__name__}", "server_error")


def _load_json(body: bytes) -> dict:
    """Strict JSON: UTF-8, no NaN/Infinity, bounded depth, no lone surrogates, an object."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"request body is not valid UTF-8 (byte {e.start})") from None
    try:
        obj = json.loads(text, parse_constant=_no_constant)
    except RecursionError:
        raise APIError(400, f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels") from None
    except (json.JSONDecodeError, ValueError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise APIError(400, "request body must be a JSON object")
    _check_json(obj, "", 0)
    return obj


def _validate(obj: dict, model: type[_Common]) -> Any:
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        msg = first.get("msg", "invalid value")
        if first.get("type") == "extra_forbidden":
            msg = "unknown field"
        raise APIError(400, f"{loc}: {msg}" if loc else msg, param=loc or None) from None


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_json(value: Any, where: str, depth: int) -> None:
    """Refuse depth beyond MAX_JSON_DEPTH and strings that are not Unicode text (lone surrogates)."""
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"request JSON is nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(
                400, f"{where or 'body'}: contains a lone surrogate (not valid Unicode)", param=where
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_json(k, where, depth + 1)
            _check_json(v, f"{where}.{k}" if where else k, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_json(v, f"{where}.{i}", depth + 1)


def _looks_like_path(value: Any) -> bool:
    return isinstance(value, str) and (
        "/" in value or "\\" in value or value.startswith((".", "~")) or ":" in value
    )


def _check_value(value: Any, hint: Any, where: str) -> None:
    if _looks_like_path(value):
        raise DllmCacheError(f"{where}: paths are not accepted from clients (got {value!r})")
    if isinstance(value, float) and not math.isfinite(value):
        raise DllmCacheError(f"{where}: must be a finite number, got {value!r}")
    try:
        TypeAdapter(hint).validate_python(value, strict=True)
    except ValidationError as e:
        raise DllmCacheError(f"{where}: {e.errors()[0]['msg']} (got {value!r})") from None


def _check_spec_overrides(overrides: dict[str, Any]) -> None:
    """A client's method spec may set decoder arguments, not what request fields set, nor paths."""
    for k, v in overrides.items():
        if k in _SET_BY_REQUEST:
            raise DllmCacheError(
                f"dllm.preset sets {k!r}, which the request's {_SET_BY_REQUEST[k]!r} field sets: use that"
            )
        if k in _SERVER_ONLY:
            raise DllmCacheError(f"dllm.preset: {k!r} is not settable by a request")
        if k != "guide_model":  # a name, checked against the server's list
            _check_value(v, _CONFIG_TYPES[k], f"dllm.preset: {k}")


def _check_cache_args(m: Method) -> None:
    cls = POLICIES.get(m.cache.replace("_", "-"))
    if cls is None:
        return  # make_policy names the unknown policy
    hints = typing.get_type_hints(cls.__init__)
    for k, v in m.cache_args.items():
        if k in hints:
            _check_value(v, hints[k], f"cache argument {k}")


def _guide_dir(name: Any, guides: dict[str, str]) -> str:
    if not isinstance(name, str) or name not in guides:
        offered = ", ".join(guides) or "none"
        raise DllmCacheError(
            f"guide_model {name!r} is not offered by this server (choose: {offered}); "
            "the server's command line chooses which models it loads"
        )
    return guides[name]


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop string (not sent yet)."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


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

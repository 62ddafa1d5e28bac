"""Batches concurrent requests with compatible settings into one generation, on one worker thread.

Requests wait in a bounded queue; the worker takes the oldest and every queued request with the same
settings (up to max_batch_size), runs one left-padded generation, and hands each request its own row.
Streaming requests receive events (text deltas, denoising canvases) through their asyncio queue.

A request holds a slot from submit() until it is answered or cancelled. The slots being generated are
a set, not a counter: the worker finishing a batch and a client leaving can race, and removing a job
twice from a set is harmless where decrementing a counter twice is not.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from dllm_cache.engine import GenerationConfig, StepEvent, generate
from dllm_cache.methods import Method
from dllm_cache.models.loading import DLLM


class QueueFull(Exception):
    pass


class Cancelled(Exception):
    """Raised inside the generation loop when every request of the batch has gone away."""


@dataclass(eq=False)  # identity: jobs live in sets and are removed by identity
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    method: Method
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None  # streaming only
    stream_denoising: bool = False
    max_tokens: int | None = None  # the generation may be rounded up to whole blocks; cut here
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent_text: str = ""
    started: bool = False  # the generation passed its checks and ran a step ("started" was sent)

    def key(self) -> str:
        """Requests with the same key can share one generation."""
        cfg = {k: v for k, v in vars(self.config).items() if k != "record_steps"}
        return json.dumps([cfg, self.method.cache, self.method.cache_args], sort_keys=True, default=str)

    def emit(self, item: Any) -> None:
        if self.events is not None and not self.cancelled.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)


@dataclass
class Metrics:
    requests: int = 0
    errors: int = 0
    batches: int = 0
    batched_requests: int = 0
    tokens: int = 0
    generation_seconds: float = 0.0
    nfe: int = 0
    position_layers: int = 0
    position_layers_total: float = 0.0
    cancelled: int = 0

    def prometheus(self, queue_length: int, in_flight: int) -> str:
        frac = self.position_layers / self.position_layers_total if self.position_layers_total else 1.0
        tps = self.tokens / self.generation_seconds if self.generation_seconds else 0.0
        rows = [
            ("dllm_requests_total", "counter", "requests accepted", self.requests),
            ("dllm_request_errors_total", "counter", "requests answered with an error", self.errors),
            ("dllm_requests_cancelled_total", "counter", "requests the client left", self.cancelled),
            ("dllm_batches_total", "counter", "generations run", self.batches),
            (
                "dllm_batched_requests_total",
                "counter",
                "requests served by those generations",
                self.batched_requests,
            ),
            ("dllm_generated_tokens_total", "counter", "completion tokens", self.tokens),
            (
                "dllm_generation_seconds_total",
                "counter",
                "time spent generating",
                round(self.generation_seconds, 6),
            ),
            ("dllm_tokens_per_second", "gauge", "completion tokens per generation second", round(tps, 3)),
            ("dllm_nfe_total", "counter", "model forward passes", self.nfe),
            ("dllm_recompute_fraction", "gauge", "position-layers recomputed / uncached", round(frac, 6)),
            ("dllm_queue_length", "gauge", "requests waiting", queue_length),
            ("dllm_in_flight", "gauge", "requests being generated", in_flight),
        ]
        out = []
        for name, kind, help_text, value in rows:
            out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n"


@dataclass
class JobResult:
    tokens: list[int]
    text: str
    prompt_tokens: int
    stats: dict


class Scheduler:
    def __init__(self, llm: DLLM, max_batch_size: int = 8, max_queue: int = 64, batch_wait_s: float = 0.01):
        self.llm, self.max_batch_size, self.max_queue, self.batch_wait_s = (
            llm,
            max_batch_size,
            max_queue,
            batch_wait_s,
        )
        self.pending: deque[Job] = deque()
        self.running: set[Job] = set()  # taken by the worker, not yet answered or cancelled
        self.metrics = Metrics()
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="dllm-scheduler", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        return len(self.running)

    def submit(self, job: Job) -> None:
        with self._cv:
            if len(self.pending) + self.in_flight >= self.max_queue:
                raise QueueFull()
            self.pending.append(job)
            self.metrics.requests += 1
            self._cv.notify()

    def cancel(self, job: Job, client_left: bool = True) -> None:
        """Stop working for this job and free its slot now (idempotent). `client_left`: the client went
        away (counted in the metrics), rather than the answer being complete early (a stop string)."""
        with self._cv:
            if job.cancelled.is_set():
                return
            job.cancelled.set()
            answered = job.future.done() or not (job in self.running or job in self.pending)
            if client_left and not answered:
                self.metrics.cancelled += 1
            if job in self.pending:
                self.pending.remove(job)
            self.running.discard(job)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)

    def _take_batch(self) -> list[Job]:
        with self._cv:
            while not self.pending and not self._stop:
                self._cv.wait()
            if self._stop:
                return []
        time.sleep(self.batch_wait_s)  # let concurrent requests arrive
        with self._cv:
            if not self.pending:
                return []
            first = self.pending.popleft()
            batch, key = [first], first.key()
            for job in list(self.pending):
                if len(batch) >= self.max_batch_size:
                    break
                if job.key() == key:
                    self.pending.remove(job)
                    batch.append(job)
            self.running.update(batch)
            return batch

    def _run(self) -> None:
        while not self._stop:
            batch = self._take_batch()
            if batch:
                self._generate(batch)

    def _on_step(self, batch: list[Job], event: StepEvent) -> None:
        if all(j.cancelled.is_set() for j in batch):
            raise Cancelled()
        if not any(j.events is not None for j in batch):
            return
        for job in batch:
            if not job.started:  # the settings were accepted: a stream may answer 200 now
                job.started = True
                job.emit(("started", None))
        tok = self.llm.tokenizer
        end_ids = set(self.llm.end_token_ids)
        for row, job in enumerate(batch):
            if job.events is None or job.cancelled.is_set():
                continue
            canvas = event.tokens[row]  # read with the engine's one host read of the step
            if job.stream_denoising:
                shown = ["<mask>" if t == event.mask_id else tok.decode([t]) for t in canvas]
                job.emit(("canvas", {"step": event.step, "block": event.block, "tokens": shown}))
            # the committed prefix (up to the first end token) can be sent as text now
            prefix: list[int] = []
            for t in canvas[: job.max_tokens]:
                if t == event.mask_id or t in end_ids:
                    break
                prefix.append(t)
            text = tok.decode(prefix, skip_special_tokens=True)
            if len(text) > len(job.sent_text) and text.startswith(job.sent_text):
                job.emit(("text", text[len(job.sent_text) :]))
                job.sent_text = text

    def _generate(self, batch: list[Job]) -> None:
        first = batch[0]
        try:
            out = generate(
                self.llm,
                [j.prompt_ids for j in batch],
                first.config,
                cache=first.method.policy(),
                on_step=lambda e: self._on_step(batch, e),  # also stops a batch every client left
            )
        except Cancelled:
            with self._cv:
                self.running.difference_update(batch)
            return
        except Exception as e:  # noqa: BLE001 - every waiting client must hear about it
            with self._cv:
                live = [j for j in batch if not j.cancelled.is_set()]
                self.running.difference_update(batch)
                self.metrics.errors += len(live)
            for j in live:
                j.loop.call_soon_threadsafe(_set_exception, j.future, e)
                j.emit(("error", e))
            return
        s = out.stats
        with self._cv:
            self.running.difference_update(batch)
            m = self.metrics
            m.batches += 1
            m.batched_requests += len(batch)
            m.tokens += s.generated_tokens
            m.generation_seconds += s.wall_time_s
            m.nfe += s.nfe
            m.position_layers += s.position_layers
            m.position_layers_total += s.position_layers_total
        tok = self.llm.tokenizer
        for row, job in enumerate(batch):
            tokens = out.tokens[row][: job.max_tokens]
            text = (
                out.texts[row]
                if len(tokens) == len(out.tokens[row])
                else tok.decode(tokens, skip_special_tokens=True)
            )
            result = JobResult(tokens, text, len(job.prompt_ids), s.to_dict())
            job.loop.call_soon_threadsafe(_set_result, job.future, result)
            job.emit(("done", result))


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)

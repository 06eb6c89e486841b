"""The in-process engine: one base model, every adapter attached, one worker thread.

Requests from any number of chats are queued; the worker runs them in micro-batches in which every
row may use a different adapter. Generation is continuously batched: new requests are prefilled and
merged into the running batch between decode steps, and finished rows leave it, so a long story does
not hold up a short answer. Text deltas stream back to the event loop as they are decoded. The event
loop never runs model code.

The model itself sits behind a small backend interface (``bot.engine.backend``): ``"fast"``
(``backend_fast``: batched multi-adapter LoRA, slot KV cache, the default for Llama-shaped models) or
``"peft"`` (``backend_peft``: transformers + PEFT ``adapter_names``, the reference). Both compute the same
greedy tokens. This module knows nothing of either beyond that interface, except which one to build.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from bot.adapters import AdapterInfo, AdapterProblem, scan_adapters, shape_signature
from bot.config import Config
from bot.engine import Classification, Generation, SamplingParams, TextSink
from bot.engine.backend import Backend, BatchState
from bot.engine.light_model import LightModel, LightUnsupported, load_light
from bot.engine.loading import BaseModelRef, load_model, resolve_base
from bot.engine.sampling import choose_next_tokens, softmax
from bot.engine.token_scores import as_array, biased, check_sampling, token_scores
from bot.errors import AdapterError, ChoicesError, EngineError
from bot.span_constraint import SpanConstraint

log = logging.getLogger(__name__)


@dataclass
class _Job:
    prompt_ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    cancelled: bool = False
    key: str | None = None      # the backend's name for the adapter version this request runs on
    in_burst: bool = False      # another request was queued less than batch_wait before this one


@dataclass
class _ClassifyJob(_Job):
    choice_ids: list[int] = field(default_factory=list)
    choices: tuple[str, ...] = ()


@dataclass
class _GenerateJob(_Job):
    params: SamplingParams = field(default_factory=SamplingParams)
    deltas: asyncio.Queue[str | None] | None = None
    span: SpanConstraint | None = None


JobT = TypeVar("JobT", bound=_Job)
MAX_CONTEXT = 2048     # tokens a request may span unless the model's context or engine.max_row_tokens is less
TRIM_EVERY_S = 10.0   # at most this often, memory freed by finished batches goes back to the OS


def _malloc_trim() -> Any:
    """glibc's malloc_trim, or None (another C library, another OS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_TRIM = _malloc_trim()


@dataclass
class _ControlJob:
    action: str  # "reload" | "stop"
    loop: asyncio.AbstractEventLoop | None = None
    future: asyncio.Future[Any] | None = None
    cancelled: bool = False


@dataclass
class _Row:
    """One generation in flight inside the running batch."""

    job: _GenerateJob
    position: int                       # position id of the next input token
    generated: list[int] = field(default_factory=list)
    emitted: int = 0                    # characters of the decoded text already streamed
    text: str = ""
    generator: np.random.Generator | None = None
    finish: str | None = None
    claim: int = 0                      # KV cache columns this row may grow to (prompt + max new tokens)
    logprobs: list[Any] = field(default_factory=list)   # TokenLogprob per generated token, when asked for


def _resolve(job: _Job | _ControlJob, value: Any = None, error: BaseException | None = None) -> None:
    loop, fut = job.loop, job.future
    if loop is None or fut is None:
        return

    def settle() -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        loop.call_soon_threadsafe(settle)


def choose_backend(model: Any, backend: str, *, max_context: int, cpu_kernel: bool,
                   pad_token_id: int | None = None, int8_activations: bool = False) -> Backend:
    """The backend for ``model``: "auto" (fast when the model supports it, else peft), "fast" or "peft"."""
    from bot.engine.backend_fast import FastBackend
    from bot.engine.fast_llama import unsupported

    if backend not in ("auto", "fast", "peft"):
        raise EngineError(f"unknown engine backend {backend!r} (auto, fast or peft)")
    if isinstance(model, LightModel):  # loaded without transformers (light_model): only the fast backend runs it
        if backend == "peft":
            raise EngineError("the PEFT backend needs the model loaded by transformers (bot.engine.loading.load_model)")
        return FastBackend.from_weights(model.config, model.weights, max_context=max_context, cpu_kernel=cpu_kernel,
                                        int8_activations=int8_activations)
    if backend != "peft":
        reason = unsupported(model)
        if reason is None:
            return FastBackend.from_model(model, max_context=max_context, cpu_kernel=cpu_kernel,
                                          int8_activations=int8_activations)
        if backend == "fast":
            raise EngineError(f"the fast backend cannot run this model: {reason}")
        log.info("engine: PEFT backend (%s)", reason)
    from bot.engine.backend_peft import PeftBackend

    return PeftBackend(model, pad_token_id=pad_token_id)


class LocalEngine:
    """``bot.engine.Engine`` implemented in-process over one ``Backend`` and one worker thread."""

    def __init__(
        self, model: Any, tokenizer: Any, base: BaseModelRef, adapters_dir: Path | None, *,
        max_batch: int = 16, batch_wait_ms: int = 5, max_context: int = MAX_CONTEXT, backend: str | Backend = "auto",
        cpu_kernel: bool = True, max_row_tokens: int = 0, kv_token_budget: int = 0, int8_activations: bool = False,
    ):
        """``model``: a transformers or light model (ignored when ``backend`` is a ``Backend`` already);
        ``backend``: "auto", "fast", "peft" or a ready ``Backend``; ``cpu_kernel``: let the fast backend
        use its compiled small-batch matmul on x86 CPUs. ``max_row_tokens`` caps one request's prompt +
        reply (0: the model's context); ``kv_token_budget`` caps the KV cache of all running rows
        together, in tokens (0: ``max_batch`` full rows): requests that do not fit wait."""
        self.base_model = base.name
        self._base = base
        self._tok = tokenizer
        self._adapters_dir = adapters_dir
        self._adapters: dict[str, AdapterInfo] = {}
        self._loaded_mtimes: dict[str, float] = {}
        self._live: dict[str, str] = {}        # adapter name -> the backend key of the version now served
        self._versions: dict[str, int] = {}
        self._retiring: set[str] = set()       # backend keys replaced or removed, detached once unused
        self._problems: list[AdapterProblem] = []
        config = backend.config if isinstance(backend, Backend) else model.config
        self._shape = shape_signature(config)
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.max_context = min(max_context, getattr(config, "max_position_embeddings", max_context))
        if max_row_tokens > 0:
            self.max_context = min(self.max_context, max_row_tokens)
        self.kv_budget = kv_token_budget if kv_token_budget > 0 else max_batch * self.max_context
        # A request must fit alone, else it could never start.
        self.max_context = min(self.max_context, self.kv_budget)
        self._eos_ids = self._stop_token_ids(config)
        if isinstance(backend, Backend):
            self._backend = backend
        else:
            self._backend = choose_backend(model, backend, max_context=self.max_context, cpu_kernel=cpu_kernel,
                                           pad_token_id=tokenizer.pad_token_id, int8_activations=int8_activations)
        self.backend = self._backend.name
        self._queue: queue.Queue[_Job | _ControlJob] = queue.Queue()
        self._closed = False
        self._last_put = float("-inf")
        self._dead: str | None = None   # why the worker thread ended, if it ever does
        self.in_flight = 0              # rows in the running batch (written by the worker only)
        self.decode_steps = 0           # decode steps run since start
        self.waiting = 0                # admitted requests waiting for room in the batch (worker only)
        self.decode_batch_sizes: dict[int, int] = {}   # rows -> decode steps run with that many (worker only)
        self.kv_waits = 0               # scheduler steps in which a request waited for KV memory to free up
        self._trimmed_at = time.monotonic()
        self._attach_adapters()
        self._thread = threading.Thread(target=self._worker, name="lorabot-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Config, *, progress: bool = True) -> LocalEngine:
        """Load the base model and every adapter (blocking: call it off the event loop)."""
        base = resolve_base(config.model.base, progress=progress)
        model, tokenizer = None, None
        backend: str | Backend = config.engine.backend
        native = cls._native_backend(config, base)
        if native is not None:
            backend, tokenizer = native
        elif backend != "peft":
            try:  # without importing transformers: a much faster start and less memory
                quantized = config.engine.cpu_kernel and config.engine.quantized
                model, tokenizer = load_light(
                    base.path, dtype=config.model.dtype, device=config.model.device, threads=config.model.threads,
                    gguf=base.gguf if quantized else None,
                )
            except LightUnsupported as exc:
                log.info("engine: loading %s with transformers (%s)", base.name, exc)
        if native is None and model is None:
            model, tokenizer = load_model(
                base.path, dtype=config.model.dtype, device=config.model.device, threads=config.model.threads,
            )
        return cls(
            model, tokenizer, base, config.path(config.adapters.dir),
            max_batch=config.engine.max_batch, batch_wait_ms=config.engine.batch_wait_ms,
            backend=backend, cpu_kernel=config.engine.cpu_kernel,
            max_row_tokens=config.engine.max_row_tokens, kv_token_budget=config.engine.kv_token_budget,
            int8_activations=config.engine.int8_activations,
        )

    @staticmethod
    def _native_backend(config: Config, base: BaseModelRef) -> tuple[Backend, Any] | None:
        """The fast backend on ``NativeLlama`` (no torch import: a faster start, ~200 MB less memory) and
        its tokenizer, or None when the model or the settings need the torch engine."""
        from bot.engine import native_llama
        from bot.engine.backend_fast import FastBackend
        from bot.engine.light_model import LightTokenizer

        reason = native_llama.config_reason(config)
        if reason is None:
            try:
                tokenizer = LightTokenizer(base.path)
                fast = native_llama.load(
                    base.path, gguf=base.gguf if config.engine.quantized else None,
                    max_context=min(MAX_CONTEXT, config.engine.max_row_tokens or MAX_CONTEXT),
                    threads=config.model.threads,
                    int8_activations=config.engine.int8_activations,
                )
                return FastBackend(fast), tokenizer
            except (native_llama.NativeUnsupported, LightUnsupported) as exc:
                reason = str(exc)
        log.info("engine: the torch engine runs %s (%s)", base.name, reason)
        return None

    def _stop_token_ids(self, config: Any) -> set[int]:
        ids = {self._tok.eos_token_id}
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, list) else [eos])
        return {i for i in ids if i is not None}

    # ----------------------------------------------------------------- adapters
    @property
    def adapters(self) -> dict[str, AdapterInfo]:
        return dict(self._adapters)

    @property
    def problems(self) -> list[AdapterProblem]:
        return list(self._problems)

    def _attach_adapters(self) -> None:
        """Scan the folder and make the served adapters match it (worker thread or constructor only).

        Runs between two decode steps, also while rows decode. A new or changed folder is loaded under a
        fresh backend key and swapped in only once it loaded; requests admitted from then on use it, rows
        already running finish on the weights they started with (the old key is detached once no row uses
        it). A replacement that fails validation or loading leaves the old version serving, reported.
        """
        if self._adapters_dir is None:
            return
        found, problems = scan_adapters(self._adapters_dir, base_model=self.base_model, base_shape=self._shape)
        broken = {p.name for p in problems}
        for name in list(self._adapters):
            if name not in found and name not in broken:  # the folder is gone: stop serving it
                self._retiring.add(self._live.pop(name))
                del self._adapters[name]
        for name, info in found.items():
            if name in self._adapters and self._mtime(info) == self._loaded_mtimes.get(name):
                continue
            self._versions[name] = self._versions.get(name, 0) + 1
            key = name if self._versions[name] == 1 else f"{name}__v{self._versions[name]}"
            try:
                started = time.perf_counter()
                self._backend.attach(dataclasses.replace(info, name=key))
            except Exception as exc:  # a corrupt weights file must not stop the other adapters
                kept = " (the previous version keeps serving)" if name in self._adapters else ""
                problems.append(AdapterProblem(name, info.path, f"cannot be loaded: {exc}{kept}"))
                continue
            if name in self._live:
                self._retiring.add(self._live[name])
            self._live[name], self._adapters[name] = key, info
            self._loaded_mtimes[name] = self._mtime(info)
            log.info("adapter %s (%s) attached in %.1f ms", name, info.task, (time.perf_counter() - started) * 1e3)
        self._problems = problems
        for problem in problems:
            log.warning("%s", problem)

    def _detach_unused(self, rows: list[_Row], pending: list[_GenerateJob]) -> None:
        """Detach replaced or removed adapter versions that no running or admitted request uses any more."""
        if not self._retiring:
            return
        busy = {r.job.key for r in rows} | {j.key for j in pending}
        for key in [k for k in self._retiring if k not in busy]:
            self._retiring.discard(key)
            self._backend.detach(key)

    def _bind(self, job: _Job) -> bool:
        """Fix the adapter version a request runs on (at admission); False when its adapter is gone."""
        if job.adapter is None:
            return True
        job.key = self._live.get(job.adapter)
        if job.key is None:
            _resolve(job, error=AdapterError(f"adapter {job.adapter!r} is not loaded any more"))
            return False
        return True

    @staticmethod
    def _mtime(info: AdapterInfo) -> float:
        return max((info.path / f).stat().st_mtime for f in ("adapter_model.safetensors", "adapter_config.json"))

    async def reload_adapters(self) -> list[AdapterProblem]:
        await self._submit(_ControlJob("reload"))
        return self.problems

    def stats(self) -> dict[str, Any]:
        """A read-only snapshot for monitoring (``lorabot serve``'s /metrics), read from the worker's counters."""
        return {"queued": self._queue.qsize() + self.waiting, "running_rows": self.in_flight,
                "decode_steps": self.decode_steps, "decode_batch_sizes": dict(self.decode_batch_sizes),
                "max_batch": self.max_batch, "alive": self._dead is None}

    @property
    def base_shape(self) -> str:
        """The base model's shape signature, which an adapter's manifest must match."""
        return self._shape

    # ----------------------------------------------------------------- public requests
    def count_tokens(self, text: str) -> int:
        return len(self._tok(text, add_special_tokens=False).input_ids)

    def chat_prompt(self, messages: list[dict[str, str]]) -> str:
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _encode(self, prompt: str, reserve: int) -> list[int]:
        ids = self._tok(prompt, add_special_tokens=False).input_ids
        budget = max(1, self.max_context - reserve)
        # Keep the end: that is where the question and the "Answer:" cue are.
        return ids[-budget:] if len(ids) > budget else ids

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self._adapters:
            raise AdapterError(f"adapter {adapter!r} is not loaded")

    async def classify(self, prompt: str, choices: Sequence[str], adapter: str | None) -> Classification:
        self._check_adapter(adapter)
        choice_ids = [self._tok(c, add_special_tokens=False).input_ids[0] for c in choices]
        if len(set(choice_ids)) != len(choice_ids):
            raise ChoicesError(f"choices {list(choices)} do not start with distinct tokens")
        loop = asyncio.get_running_loop()
        job = _ClassifyJob(
            prompt_ids=self._encode(prompt, 1), adapter=adapter, loop=loop, future=loop.create_future(),
            choice_ids=choice_ids, choices=tuple(choices),
        )
        return await self._submit(job)

    async def generate(
        self, prompt: str, params: SamplingParams, adapter: str | None, on_text: TextSink | None = None,
    ) -> Generation:
        self._check_adapter(adapter)
        check_sampling(params, self._backend.config.vocab_size)
        loop = asyncio.get_running_loop()
        job = _GenerateJob(
            prompt_ids=self._encode(prompt, params.max_new_tokens), adapter=adapter, loop=loop,
            future=loop.create_future(), params=params, deltas=asyncio.Queue() if on_text else None,
            span=SpanConstraint.for_text(self._tok, params.span_of, params.stop) if params.span_of else None,
        )
        if on_text is None:
            return await self._submit(job)
        self._put(job)
        try:
            pump = asyncio.ensure_future(self._pump(job, on_text))
            try:
                result = await asyncio.shield(job.future)
            finally:
                # Every delta was queued before the future settled (same thread, FIFO callbacks), so
                # the pump has seen all text once it reaches this end marker.
                job.deltas.put_nowait(None)
                await pump
            return result
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    @staticmethod
    async def _pump(job: _GenerateJob, on_text: TextSink) -> None:
        assert job.deltas is not None
        while (delta := await job.deltas.get()) is not None:
            if job.cancelled:
                continue
            try:
                await on_text(delta)
            except BaseException as exc:
                # Nobody can receive the rest: stop generating (the worker frees the row at its next step)
                # and end the request with the callback's error.
                job.cancelled = True
                if not job.future.done():
                    job.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise

    def _put(self, job: _Job | _ControlJob) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")
        if self._dead is not None:
            raise self._dead_error()
        if isinstance(job, _Job):
            now = time.monotonic()
            job.in_burst, self._last_put = now - self._last_put < self.batch_wait, now
        self._queue.put(job)
        if self._dead is not None:  # the worker died between the check and the put: nobody will take it
            self._fail_queued()

    async def _submit(self, job: _Job | _ControlJob) -> Any:
        loop = asyncio.get_running_loop()
        job.loop, job.future = loop, loop.create_future()
        self._put(job)
        try:
            return await job.future
        except asyncio.CancelledError:
            job.cancelled = True
            raise

    async def close(self) -> None:
        if self._closed:
            return
        if self._dead is None and self._thread.is_alive():
            await self._submit(_ControlJob("stop"))
        self._closed = True
        await asyncio.to_thread(self._thread.join, 10)

    # ----------------------------------------------------------------- worker thread
    def _worker(self) -> None:
        rows: list[_Row] = []
        pending: list[_GenerateJob] = []
        batch: BatchState | None = None
        stop_job: _ControlJob | None = None
        try:
            while True:
                jobs = self._drain(block=not rows and not pending)
                try:
                    classify: list[_ClassifyJob] = []
                    for job in jobs:
                        if isinstance(job, _ControlJob):
                            if job.action == "reload":  # between two decode steps, rows running or not
                                try:
                                    self._attach_adapters()
                                    _resolve(job, None)
                                except Exception as exc:
                                    _resolve(job, error=EngineError(f"reloading adapters failed: {exc}"))
                            else:
                                stop_job = job
                        elif not self._bind(job):
                            continue
                        elif isinstance(job, _ClassifyJob):
                            classify.append(job)
                        else:
                            pending.append(job)
                    for group in self._groups(classify, self.kv_budget):
                        self._run_classify(group)
                    admitted, pending = self._fit(rows, pending)
                    if admitted:
                        if batch is None:
                            batch = self._backend.new_batch(self.max_batch, self.kv_budget)
                        rows = self._admit(rows, batch, admitted)
                    if rows:
                        assert batch is not None
                        rows = self._decode_step(rows, batch)
                except Exception as exc:
                    # A fault in the scheduler itself: fail the requests it touched, keep serving the rest.
                    log.exception("engine step failed")
                    error = EngineError(f"the engine failed on this request: {exc}")
                    for job in [*jobs, *(r.job for r in rows)]:
                        if job is not stop_job:
                            _resolve(job, error=error)
                    pending = [j for j in pending if j not in jobs]
                    rows = []
                self._detach_unused(rows, pending)
                if not rows:
                    batch = None  # the next batch starts with an empty cache
                self._give_back_memory()
                self.in_flight, self.waiting = len(rows), len(pending)
                if stop_job is not None and not rows and not pending:
                    _resolve(stop_job, None)
                    return
        except BaseException as exc:
            # Ends the thread (logged as critical); re-raising would only print a second traceback.
            self._die(f"{type(exc).__name__}: {exc}", [*pending, *(r.job for r in rows)])

    def _give_back_memory(self) -> None:
        """Batches of varying shapes leave freed blocks in malloc's per-thread arenas, which glibc keeps:
        without trimming, RSS creeps up under steady traffic although the live tensors stay bounded."""
        now = time.monotonic()
        if _TRIM is not None and now - self._trimmed_at >= TRIM_EVERY_S:
            self._trimmed_at = now
            _TRIM(0)

    def _die(self, reason: str, held: list[_Job]) -> None:
        """The worker is ending abnormally: fail everything it held or will be sent, at once."""
        self._dead = reason
        log.critical("the engine's worker stopped: %s", reason)
        for job in held:
            _resolve(job, error=self._dead_error())
        self._fail_queued()

    def _dead_error(self) -> EngineError:
        return EngineError(f"the engine stopped working ({self._dead}); restart the bot")

    def _fail_queued(self) -> None:
        """Settle everything waiting in the queue of a dead worker (a stop request succeeds: close() returns)."""
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._queue.get_nowait()
                if isinstance(job, _ControlJob) and job.action == "stop":
                    _resolve(job, None)
                else:
                    _resolve(job, error=self._dead_error())

    def _drain(self, block: bool) -> list[_Job | _ControlJob]:
        jobs: list[_Job | _ControlJob] = []
        try:
            if block:
                jobs.append(self._queue.get())
                deadline = time.monotonic() + self.batch_wait
                # Wait briefly for companions so that requests arriving together share one batch, but only
                # while they do arrive together: a lone request (the previous one came more than batch_wait
                # earlier) does not wait for company that is not coming (5 ms of a 50 ms classification).
                # Requests queued at once are drained below without waiting; nothing waits for a control job.
                while len(jobs) < self.max_batch and getattr(jobs[-1], "in_burst", False):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    jobs.append(self._queue.get(timeout=remaining))
            while True:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if not j.cancelled]

    def _isolate(self, jobs: Sequence[_Job], run: Any) -> list[Any]:
        """Run ``run(jobs)``; if the batch fails, run each job alone so one bad request fails alone."""
        try:
            return [run(list(jobs))]
        except Exception:
            if len(jobs) == 1:
                raise
            log.exception("batch of %d failed; retrying its requests one by one", len(jobs))
        results = []
        for job in jobs:
            try:
                results.append(run([job]))
            except Exception as exc:
                log.exception("request failed")
                _resolve(job, error=EngineError(f"the model failed on this request: {exc}"))
        return results

    def _claim(self, job: _GenerateJob) -> int:
        return min(self.max_context, len(job.prompt_ids) + job.params.max_new_tokens)

    def _fit(self, rows: list[_Row], pending: list[_GenerateJob]) -> tuple[list[_GenerateJob], list[_GenerateJob]]:
        """The pending requests that join the batch now, in arrival order, and those that wait.

        The KV cache is one dense block, rows x the widest row, so a request is admitted only while
        (rows + 1) x the widest claim stays within the budget. The first request that does not fit stops
        admission: later, shorter ones do not overtake it, so a long prompt waits for rows to finish
        instead of waiting for ever behind a stream of short ones."""
        widest = max((r.claim for r in rows), default=0)
        taken = 0
        for job in pending[: self.max_batch - len(rows)]:
            wider = max(widest, self._claim(job))
            if (len(rows) + taken + 1) * wider > self.kv_budget:
                self.kv_waits += 1
                break
            widest, taken = wider, taken + 1
        return pending[:taken], pending[taken:]

    def _groups(self, jobs: Sequence[JobT], tokens: int) -> list[list[JobT]]:
        """Consecutive groups of at most ``max_batch`` prompts, each group's padded size (rows x the
        longest prompt) within ``tokens``: attention over a padded group costs rows x width^2, so a long
        prompt is computed apart from short ones instead of padding them all to its length."""
        groups: list[list[JobT]] = []
        group: list[JobT] = []
        widest = 0
        for job in jobs:
            wider = max(widest, len(job.prompt_ids))
            if group and (len(group) == self.max_batch or (len(group) + 1) * wider > tokens):
                groups.append(group)
                group, wider = [], len(job.prompt_ids)
            group.append(job)
            widest = wider
        return [*groups, group] if group else groups

    def _run_classify(self, jobs: list[_ClassifyJob]) -> None:
        def run(batch: list[_ClassifyJob]) -> None:
            wanted = sorted({c for job in batch for c in job.choice_ids})
            column = {c: k for k, c in enumerate(wanted)}
            logits = as_array(self._backend.score([j.prompt_ids for j in batch], [j.key for j in batch], wanted))
            for i, job in enumerate(batch):
                picked = softmax(logits[i, [column[c] for c in job.choice_ids]]).tolist()
                scores = dict(zip(job.choices, picked, strict=True))
                _resolve(job, Classification(scores=scores, prompt_tokens=len(job.prompt_ids)))

        try:
            self._isolate(jobs, run)
        except Exception as exc:
            _resolve(jobs[0], error=EngineError(f"the model failed on this request: {exc}"))

    def _admit(self, rows: list[_Row], batch: BatchState, jobs: list[_GenerateJob]) -> list[_Row]:
        """Prefill new generation jobs and merge them into the running batch."""
        def run(group: list[_GenerateJob]) -> tuple[list[_GenerateJob], np.ndarray]:
            return group, as_array(self._backend.prefill(batch, [j.prompt_ids for j in group], [j.key for j in group]))

        prefilled = []
        for group in self._groups(jobs, self.max_context):
            try:
                prefilled += self._isolate(group, run)
            except Exception as exc:
                _resolve(group[0], error=EngineError(f"the model failed on this request: {exc}"))
        for group, logits in prefilled:
            new_rows = [
                _Row(job=j, position=len(j.prompt_ids), generator=self._generator(j.params), claim=self._claim(j))
                for j in group
            ]
            rows = rows + new_rows
            self._advance(new_rows, logits)
        return self._retire(rows, batch)

    @staticmethod
    def _generator(params: SamplingParams) -> np.random.Generator | None:
        if params.temperature <= 0:
            return None
        # The API takes any int64 seed; numpy wants a non-negative one (distinct seeds stay distinct).
        return np.random.default_rng(params.seed % 2**64 if params.seed is not None else time.time_ns())

    @staticmethod
    def _within_spans(logits: np.ndarray, rows: list[_Row]) -> np.ndarray:
        """Rows with a span constraint: every token it does not allow next is masked out."""
        out = logits.copy()  # the logits may be the backend's own buffer
        for i, row in enumerate(rows):
            if row.job.span is not None:
                keep = np.array(row.job.span.allowed(row.generated), dtype=np.int64)
                masked = np.full_like(out[i], -np.inf)
                masked[keep] = out[i, keep]
                out[i] = masked
        return out

    def _advance(self, rows: list[_Row], logits: np.ndarray) -> None:
        """Pick each row's next token from ``logits`` and stream the text it adds."""
        params = [r.job.params for r in rows]
        seen = [r.job.prompt_ids + r.generated for r in rows] if any(
            p.repetition_penalty != 1.0 for p in params) else [[] for _ in rows]
        logits = biased(logits, params)
        if any(r.job.span is not None for r in rows):
            logits = self._within_spans(logits, rows)
        try:
            chosen = choose_next_tokens(logits, params, seen, [r.generator for r in rows])
        except Exception:  # one row's settings (e.g. a NaN temperature) must not fail the others
            chosen = []
            for i, row in enumerate(rows):
                try:
                    chosen += choose_next_tokens(logits[i:i + 1], [params[i]], [seen[i]], [row.generator])
                except Exception as exc:
                    log.exception("sampling failed for one request")
                    _resolve(row.job, error=EngineError(f"the model failed on this request: {exc}"))
                    row.job.cancelled = True  # settled: leaves the batch at the next retire
                    chosen.append(-1)
        scores = token_scores(logits, chosen, params, self._tok)
        for row, token, score in zip(rows, chosen, scores, strict=True):
            if row.job.cancelled:
                row.finish = "cancelled"
                continue
            if token in self._eos_ids:
                row.finish = "stop"
                continue
            row.generated.append(token)
            if score is not None:
                row.logprobs.append(score)
            row.text = self._tok.decode(row.generated, skip_special_tokens=True)
            params = row.job.params
            cut = min((i for i in (row.text.find(s) for s in params.stop) if i >= 0), default=-1)
            if cut >= 0:
                row.text = row.text[:cut]
                row.finish = "stop"
            elif len(row.generated) >= params.max_new_tokens or row.position + len(row.generated) >= self.max_context:
                row.finish = "length"
            self._stream(row)

    @staticmethod
    def _stream(row: _Row) -> None:
        job = row.job
        if job.deltas is None:
            return
        text = row.text
        if row.finish is None:
            # Hold back an incomplete UTF-8 character and anything that may be the start of a stop string.
            text = text.rstrip("\ufffd")
            for stop in job.params.stop:
                for k in range(min(len(stop) - 1, len(text)), 0, -1):
                    if text.endswith(stop[:k]):
                        text = text[:-k]
                        break
        if len(text) > row.emitted:
            delta, row.emitted = text[row.emitted:], len(text)
            try:
                job.loop.call_soon_threadsafe(job.deltas.put_nowait, delta)
            except RuntimeError:
                job.cancelled = True

    def _retire(self, rows: list[_Row], batch: BatchState) -> list[_Row]:
        """Resolve finished rows and drop them from the running batch."""
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        for r in rows:
            if r.finish is not None and r.finish != "cancelled":
                self._stream(r)
                _resolve(r.job, Generation(
                    text=r.text, prompt_tokens=len(r.job.prompt_ids), completion_tokens=len(r.generated),
                    finish_reason=r.finish, logprobs=tuple(r.logprobs) if r.job.params.logprobs is not None else None,
                ))
        if not keep:
            return []
        if len(keep) < len(rows):
            return [rows[i] for i in self._backend.retire(batch, keep)]
        return rows

    def _decode_step(self, rows: list[_Row], batch: BatchState) -> list[_Row]:
        self.decode_steps += 1
        self.decode_batch_sizes[len(rows)] = self.decode_batch_sizes.get(len(rows), 0) + 1
        try:
            logits = as_array(self._backend.decode(
                batch, [r.generated[-1] for r in rows], [r.position + len(r.generated) - 1 for r in rows],
                [r.job.key for r in rows],
            ))
        except Exception as exc:
            log.exception("decode step failed")
            for r in rows:
                _resolve(r.job, error=EngineError(f"the model failed while generating: {exc}"))
            return []
        self._advance(rows, logits)
        return self._retire(rows, batch)

"""The in-process engine: one base model, every adapter attached, one worker thread.

Requests from any number of chats are queued; the worker runs them in micro-batches in which every
row may use a different adapter. Generation is continuously batched: new requests are prefilled and
merged into the running batch between decode steps, and finished rows leave it, so a long story does
not hold up a short answer. Text deltas stream back to the event loop as they are decoded. The event
loop never runs model code.

Two backends compute the same greedy tokens:
* ``"fast"`` (``bot.fast_lora``, the default for Llama-shaped models): fused projections, every adapter
  applied in one batched LoRA matmul pair per projection group, a slot KV cache written in place;
* ``"peft"``: transformers + PEFT ``adapter_names`` (``"__base__"`` for the bare model), the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bot.adapters import AdapterInfo, AdapterProblem, scan_adapters
from bot.config import Config
from bot.engine import Classification, Generation, SamplingParams, TextSink
from bot.errors import AdapterError, EngineError
from bot.fast_lora import Columns, FastLlama, unsupported
from bot.light_model import LightModel, LightUnsupported, load_light
from bot.models import BaseModelRef, load_model, resolve_base, shape_signature
from bot.sampling import choose_next_tokens

log = logging.getLogger(__name__)

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch


@dataclass
class _Job:
    prompt_ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    cancelled: bool = False


@dataclass
class _ClassifyJob(_Job):
    choice_ids: list[int] = field(default_factory=list)
    choices: tuple[str, ...] = ()


@dataclass
class _GenerateJob(_Job):
    params: SamplingParams = field(default_factory=SamplingParams)
    deltas: asyncio.Queue[str | None] | None = None


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
    generator: torch.Generator | None = None
    finish: str | None = None


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


class LocalEngine:
    """``bot.engine.Engine`` implemented in-process with transformers + PEFT."""

    def __init__(
        self, model: Any, tokenizer: Any, base: BaseModelRef, adapters_dir: Path | None, *,
        max_batch: int = 16, batch_wait_ms: int = 5, max_context: int = 2048, backend: str = "auto",
        cpu_kernel: bool = True,
    ):
        """``backend``: "auto" (fast when the model supports it, else peft), "fast" or "peft";
        ``cpu_kernel``: let the fast backend use its compiled small-batch matmul on x86 CPUs."""
        self.base_model = base.name
        self._base = base
        self._model = model              # the plain transformers model, or a PeftModel around it
        self._tok = tokenizer
        self._adapters_dir = adapters_dir
        self._adapters: dict[str, AdapterInfo] = {}
        self._loaded_mtimes: dict[str, float] = {}
        self._problems: list[AdapterProblem] = []
        self._shape = shape_signature(model.config)
        self.max_batch = max_batch
        self.batch_wait = batch_wait_ms / 1000
        self.max_context = min(max_context, getattr(model.config, "max_position_embeddings", max_context))
        light = isinstance(model, LightModel)
        self.device = model.device if light else next(model.parameters()).device
        self._eos_ids = self._stop_token_ids()
        self._fast: FastLlama | None = None
        if backend not in ("auto", "fast", "peft"):
            raise EngineError(f"unknown engine backend {backend!r} (auto, fast or peft)")
        if light:  # loaded without transformers (bot.light_model): only the fast backend can run it
            if backend == "peft":
                raise EngineError("the PEFT backend needs the model loaded by transformers (bot.models.load_model)")
            self._fast = FastLlama(model.config, model.weights, max_context=self.max_context, cpu_kernel=cpu_kernel)
        elif backend != "peft":
            reason = unsupported(model)
            if reason is None:
                self._fast = FastLlama.from_model(model, max_context=self.max_context, cpu_kernel=cpu_kernel)
            elif backend == "fast":
                raise EngineError(f"the fast backend cannot run this model: {reason}")
            else:
                log.info("engine: PEFT backend (%s)", reason)
        self.backend = "fast" if self._fast is not None else "peft"
        self._queue: queue.Queue[_Job | _ControlJob] = queue.Queue()
        self._closed = False
        self._attach_adapters()
        self._thread = threading.Thread(target=self._worker, name="lorabot-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: Config, *, progress: bool = True) -> LocalEngine:
        """Load the base model and every adapter (blocking: call it off the event loop)."""
        base = resolve_base(config.model.base, progress=progress)
        model, tokenizer = None, None
        if config.engine.backend != "peft":
            try:  # without importing transformers: a much faster start and less memory
                quantized = config.engine.cpu_kernel and config.engine.quantized
                model, tokenizer = load_light(
                    base.path, dtype=config.model.dtype, device=config.model.device, threads=config.model.threads,
                    gguf=base.gguf if quantized else None,
                )
            except LightUnsupported as exc:
                log.info("engine: loading %s with transformers (%s)", base.name, exc)
        if model is None:
            model, tokenizer = load_model(
                base.path, dtype=config.model.dtype, device=config.model.device, threads=config.model.threads,
            )
        return cls(
            model, tokenizer, base, config.path(config.adapters.dir),
            max_batch=config.engine.max_batch, batch_wait_ms=config.engine.batch_wait_ms,
            backend=config.engine.backend, cpu_kernel=config.engine.cpu_kernel,
        )

    def _stop_token_ids(self) -> set[int]:
        ids = {self._tok.eos_token_id}
        eos = getattr(self._model.config, "eos_token_id", None)
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
        """Scan the folder and make the attached adapters match it (worker thread or constructor only)."""
        if self._adapters_dir is None:
            return
        found, problems = scan_adapters(self._adapters_dir, base_model=self.base_model, base_shape=self._shape)
        for name in list(self._adapters):
            changed = name in found and self._mtime(found[name]) != self._loaded_mtimes.get(name)
            if name not in found or changed:
                if self._fast is not None:
                    self._fast.remove_adapter(name)
                else:
                    self._model.delete_adapter(name)
                del self._adapters[name]
        for name, info in found.items():
            if name in self._adapters:
                continue
            try:
                started = time.perf_counter()
                self._load_adapter(info)
                self._adapters[name] = info
                self._loaded_mtimes[name] = self._mtime(info)
                log.info("adapter %s (%s) attached in %.1f ms", name, info.task, (time.perf_counter() - started) * 1e3)
            except Exception as exc:  # a corrupt weights file must not stop the other adapters
                problems.append(AdapterProblem(name, info.path, f"cannot be loaded: {exc}"))
        self._problems = problems
        for problem in problems:
            log.warning("%s", problem)

    @staticmethod
    def _mtime(info: AdapterInfo) -> float:
        return max((info.path / f).stat().st_mtime for f in ("adapter_model.safetensors", "adapter_config.json"))

    def _load_adapter(self, info: AdapterInfo) -> None:
        if self._fast is not None:
            self._fast.add_adapter(info.name, info.path)
            return
        from peft import PeftModel

        with warnings.catch_warnings():
            # PEFT still calls a transformers helper deprecated in v5; the warning says nothing to users.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            self._attach(info, PeftModel)
        self._model.eval()

    def _attach(self, info: AdapterInfo, peft_model_cls: Any) -> None:
        if isinstance(self._model, peft_model_cls):
            self._model.load_adapter(str(info.path), adapter_name=info.name, is_trainable=False)
        else:
            self._model = peft_model_cls.from_pretrained(
                self._model, str(info.path), adapter_name=info.name, is_trainable=False,
            )

    async def reload_adapters(self) -> list[AdapterProblem]:
        await self._submit(_ControlJob("reload"))
        return self.problems

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
            raise EngineError(f"choices {list(choices)} do not start with distinct tokens")
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
        loop = asyncio.get_running_loop()
        job = _GenerateJob(
            prompt_ids=self._encode(prompt, params.max_new_tokens), adapter=adapter, loop=loop,
            future=loop.create_future(), params=params, deltas=asyncio.Queue() if on_text else None,
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
            if not job.cancelled:
                await on_text(delta)

    def _put(self, job: _Job | _ControlJob) -> None:
        if self._closed:
            raise EngineError("the engine is shut down")
        self._queue.put(job)

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
        await self._submit(_ControlJob("stop"))
        self._closed = True
        await asyncio.to_thread(self._thread.join, 10)

    # ----------------------------------------------------------------- worker thread
    def _worker(self) -> None:
        torch.set_grad_enabled(False)
        rows: list[_Row] = []
        state: dict[str, Any] = {}
        pending: list[_GenerateJob] = []
        while True:
            jobs = self._drain(block=not rows and not pending)
            stop = False
            classify: list[_ClassifyJob] = []
            for job in jobs:
                if isinstance(job, _ControlJob):
                    if job.action == "reload":
                        if rows:  # adapters cannot change under a running batch: finish it first
                            self._queue.put(job)
                            continue
                        try:
                            self._attach_adapters()
                            _resolve(job, None)
                        except Exception as exc:
                            _resolve(job, error=EngineError(f"reloading adapters failed: {exc}"))
                    else:
                        stop = True
                        stop_job = job
                elif isinstance(job, _ClassifyJob):
                    classify.append(job)
                else:
                    pending.append(job)
            for start in range(0, len(classify), self.max_batch):
                self._run_classify(classify[start:start + self.max_batch])
            room = self.max_batch - len(rows)
            if room > 0 and pending:
                admitted, pending = pending[:room], pending[room:]
                rows = self._admit(rows, state, admitted)
            if rows:
                rows = self._decode_step(rows, state)
            if stop and not rows and not pending:
                _resolve(stop_job, None)
                return
            if stop:  # finish what is in flight, then stop
                self._queue.put(stop_job)

    def _drain(self, block: bool) -> list[_Job | _ControlJob]:
        jobs: list[_Job | _ControlJob] = []
        try:
            if block:
                jobs.append(self._queue.get())
                deadline = time.monotonic() + self.batch_wait
                # Wait briefly for companions so that simultaneous requests share one batch
                # (not for a control job such as a reload: nothing batches with it).
                while len(jobs) < self.max_batch and not isinstance(jobs[0], _ControlJob):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    jobs.append(self._queue.get(timeout=remaining))
            while True:
                jobs.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        return [j for j in jobs if not j.cancelled]

    def _adapter_kwargs(self, adapters: list[str | None]) -> dict[str, Any]:
        if not self._adapters:
            return {}
        return {"adapter_names": [a if a is not None else BASE for a in adapters]}

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self._tok.pad_token_id if self._tok.pad_token_id is not None else 0
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return ids.to(self.device), mask.to(self.device), positions.to(self.device)

    def _forward_last(self, jobs: Sequence[_Job], cache: Any = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prefill ``jobs`` as one batch; logits at each last position [B, V] and (peft) the padding mask.

        ``cache``: peft: a DynamicCache to fill, or None. fast: a ``SlotCache`` reservation to write the
        keys/values into, ``Columns`` (only those vocabulary logits: [B, len(ids)]), or None.
        """
        if self._fast is not None:
            logits = self._fast.prefill([j.prompt_ids for j in jobs], [j.adapter for j in jobs], cache)
            return logits, None
        ids, mask, positions = self._left_pad([j.prompt_ids for j in jobs])
        out = self._model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
            use_cache=cache is not None, logits_to_keep=1, **self._adapter_kwargs([j.adapter for j in jobs]),
        )
        return out.logits[:, -1, :], mask

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

    def _run_classify(self, jobs: list[_ClassifyJob]) -> None:
        def run(batch: list[_ClassifyJob]) -> None:
            column: dict[int, int] | None = None
            if self._fast is not None:  # only the choices' logits, not the whole vocabulary
                wanted = sorted({c for job in batch for c in job.choice_ids})
                column = {c: k for k, c in enumerate(wanted)}
                logits, _ = self._forward_last(batch, Columns(wanted))
            else:
                logits, _ = self._forward_last(batch)
            for i, job in enumerate(batch):
                index = job.choice_ids if column is None else [column[c] for c in job.choice_ids]
                picked = logits[i, index].float().softmax(-1).tolist()
                scores = dict(zip(job.choices, picked, strict=True))
                _resolve(job, Classification(scores=scores, prompt_tokens=len(job.prompt_ids)))

        try:
            self._isolate(jobs, run)
        except Exception as exc:
            _resolve(jobs[0], error=EngineError(f"the model failed on this request: {exc}"))

    def _admit(self, rows: list[_Row], state: dict[str, Any], jobs: list[_GenerateJob]) -> list[_Row]:
        """Prefill new generation jobs and merge them into the running batch."""
        if self._fast is not None:
            return self._admit_fast(rows, state, jobs)
        from transformers import DynamicCache

        def run(batch: list[_GenerateJob]) -> tuple[list[_GenerateJob], Any, torch.Tensor, torch.Tensor]:
            cache = DynamicCache(config=self._base_config())
            logits, mask = self._forward_last(batch, cache)
            return batch, cache, mask, logits

        try:
            prefilled = self._isolate(jobs, run)
        except Exception as exc:
            _resolve(jobs[0], error=EngineError(f"the model failed on this request: {exc}"))
            return rows
        for batch, cache, mask, logits in prefilled:
            new_rows = [
                _Row(job=j, position=len(j.prompt_ids), generator=self._generator(j.params)) for j in batch
            ]
            self._merge(state, cache, mask)
            rows = rows + new_rows
            self._advance(new_rows, logits)
        return self._retire(rows, state)

    def _admit_fast(self, rows: list[_Row], state: dict[str, Any], jobs: list[_GenerateJob]) -> list[_Row]:
        assert self._fast is not None
        slots = state.setdefault("slots", self._fast.new_cache(self.max_batch))

        def run(batch: list[_GenerateJob]) -> tuple[list[_GenerateJob], torch.Tensor]:
            # The new rows' keys/values go straight into free slots; they join the batch only on success.
            reservation = slots.reserve(len(batch), max(len(j.prompt_ids) for j in batch))
            logits, _ = self._forward_last(batch, reservation)
            slots.commit(reservation)
            return batch, logits

        try:
            prefilled = self._isolate(jobs, run)
        except Exception as exc:
            _resolve(jobs[0], error=EngineError(f"the model failed on this request: {exc}"))
            if not rows:
                state.clear()
            return rows
        for batch, logits in prefilled:
            new_rows = [
                _Row(job=j, position=len(j.prompt_ids), generator=self._generator(j.params)) for j in batch
            ]
            rows = rows + new_rows
            self._advance(new_rows, logits)
        return self._retire(rows, state)

    def _base_config(self) -> Any:
        return getattr(self._model, "base_model", self._model).config

    @staticmethod
    def _generator(params: SamplingParams) -> torch.Generator | None:
        if params.temperature <= 0:
            return None
        gen = torch.Generator()
        gen.manual_seed(params.seed if params.seed is not None else int(time.time_ns() % 2**63))
        return gen

    @staticmethod
    def _merge(state: dict[str, Any], cache: Any, mask: torch.Tensor) -> None:
        """Append a freshly prefilled cache (and its mask) to the running batch, left-padding the shorter."""
        if "cache" not in state:
            state["cache"], state["mask"] = cache, mask
            return
        old_cache, old_mask = state["cache"], state["mask"]
        width = max(old_mask.shape[1], mask.shape[1])

        def pad(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[dim] = extra
            return torch.cat([t.new_zeros(shape), t], dim=dim)

        for old_layer, new_layer in zip(old_cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(old_layer, attr), getattr(new_layer, attr)
                setattr(old_layer, attr, torch.cat(
                    [pad(a, width - a.shape[-2], -2), pad(b, width - b.shape[-2], -2)], dim=0,
                ))
        state["mask"] = torch.cat(
            [pad(old_mask, width - old_mask.shape[1], 1), pad(mask, width - mask.shape[1], 1)], dim=0,
        )

    def _advance(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from ``logits`` and stream the text it adds."""
        params = [r.job.params for r in rows]
        seen = [r.job.prompt_ids + r.generated for r in rows] if any(
            p.repetition_penalty != 1.0 for p in params) else [[] for _ in rows]
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
        for row, token in zip(rows, chosen, strict=True):
            if row.job.cancelled:
                row.finish = "cancelled"
                continue
            if token in self._eos_ids:
                row.finish = "stop"
                continue
            row.generated.append(token)
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

    def _retire(self, rows: list[_Row], state: dict[str, Any]) -> list[_Row]:
        """Resolve finished rows and drop them (and all-padding columns) from the running batch."""
        keep = [i for i, r in enumerate(rows) if r.finish is None]
        for r in rows:
            if r.finish is not None and r.finish != "cancelled":
                self._stream(r)
                _resolve(r.job, Generation(
                    text=r.text, prompt_tokens=len(r.job.prompt_ids), completion_tokens=len(r.generated),
                    finish_reason=r.finish,
                ))
        if not keep:
            state.clear()
            return []
        if len(keep) < len(rows) and "slots" in state:
            # fast: the last rows move into the freed slots; the rows follow the cache's new order.
            return [rows[i] for i in state["slots"].retire(keep)]
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=self.device)
            state["cache"].batch_select_indices(index)
            state["mask"] = state["mask"][index]
            # Columns that are padding in every remaining row are dead weight for attention.
            first = int(state["mask"].any(0).long().argmax())
            if first > 0:
                state["mask"] = state["mask"][:, first:]
                for layer in state["cache"].layers:
                    layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
        return [rows[i] for i in keep]

    def _decode_step(self, rows: list[_Row], state: dict[str, Any]) -> list[_Row]:
        try:
            if self._fast is not None:
                logits = self._fast.decode(
                    state["slots"], [r.generated[-1] for r in rows], [r.job.adapter for r in rows],
                )
            else:
                ids = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)
                positions = torch.tensor([[r.position + len(r.generated) - 1] for r in rows], device=self.device)
                state["mask"] = torch.cat([state["mask"], state["mask"].new_ones((len(rows), 1))], dim=1)
                logits = self._model(
                    input_ids=ids, attention_mask=state["mask"], position_ids=positions, cache=state["cache"],
                    use_cache=True, **self._adapter_kwargs([r.job.adapter for r in rows]),
                ).logits[:, -1, :]
        except Exception as exc:
            log.exception("decode step failed")
            for r in rows:
                _resolve(r.job, error=EngineError(f"the model failed while generating: {exc}"))
            state.clear()
            return []
        self._advance(rows, logits)
        return self._retire(rows, state)

"""Train one adapter: set up under Accelerate, run the loop, evaluate, write the adapter folder.

Data-parallel semantics (``accelerate launch -m training train ...``): every process builds the same
global batches (a pure function of seed and epoch) and takes an interleaved, disjoint shard of each;
the loss is normalised by the global batch's loss-term count, so the averaged gradients equal those
of one process running the whole batch. Only the main process evaluates and writes.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from bot.adapters import MANIFEST, AdapterInfo, manifest_dict, shape_signature
from bot.errors import ConfigError
from training import checkpoint
from training.batching import Encoded, collate, encode, label_token_ids, length_grouped_batches, micro_batches, shard
from training.card import plot_curves, write_card
from training.config import TrainConfig, TrainSettings, fingerprint, to_toml
from training.data import Example
from training.evaluate import PRIMARY, evaluate, higher_is_better
from training.export import write_jsonl
from training.model import (
    LossModel,
    add_lora,
    init_from_adapter,
    load_base,
    load_trainable_state,
    save_adapter,
    trainable_state,
)
from training.output import check_name, publish


@dataclass
class State:
    """Everything about progress that a checkpoint must restore (besides weights/optimizer/RNG)."""

    step: int = 0                                                # position in the data order (global batches)
    losses: list[list[float]] = field(default_factory=list)      # [step, training loss]
    evals: list[dict[str, Any]] = field(default_factory=list)    # {"step", "scores": {dev set: primary metric}}
    train_s: float = 0.0                                         # seconds in optimizer steps (no eval/checkpoints)
    tokens: int = 0                                              # tokens through the model, all processes
    best: dict[str, Any] | None = None                           # keep_best: {"step", "score"} of the best eval


@dataclass
class Run:
    config: TrainConfig
    accelerator: Any
    model: Any            # the prepared LossModel (DDP-wrapped when data-parallel)
    optimizer: Any
    scheduler: Any
    tok: Any
    encoded: list[Encoded]
    plan: list[list[int]]  # every optimizer step's global batch, all epochs
    dev: dict[str, list[Example]]
    labels: tuple[str, ...]
    run_dir: Path
    state: State

    @property
    def peft(self) -> Any:
        return self.accelerator.unwrap_model(self.model).model


def fit(run: Run) -> None:
    """The training loop: shard each global batch, accumulate micro-batches, step, log, evaluate, checkpoint."""
    acc, cfg, st = run.accelerator, run.config.train, run.state
    lengths = [len(e.ids) for e in run.encoded]
    bar = tqdm(total=len(run.plan), initial=st.step, desc=f"train {run.config.task}", unit="step",
               disable=not acc.is_main_process, dynamic_ncols=True)
    run.model.train()
    while st.step < len(run.plan):
        started = time.perf_counter()
        batch = run.plan[st.step]
        mine = shard(batch, acc.process_index, acc.num_processes)
        n_terms = sum(run.encoded[i].weight for i in batch)
        # Summed loss x processes / global count: DDP's gradient averaging then yields the global mean.
        # A process with no examples (a last batch smaller than the world) still joins with weight 0.
        scale = acc.num_processes / n_terms if mine else 0.0
        micro = micro_batches(mine or batch[:1], lengths, cfg.micro_batch_tokens)
        loss_sum = torch.zeros((), device=acc.device)
        for k, ids in enumerate(micro):
            with nullcontext() if k == len(micro) - 1 else acc.no_sync(run.model):  # sync once per step
                inputs = collate([run.encoded[i] for i in ids], run.tok.pad_token_id)
                loss, _ = run.model(**{name: t.to(acc.device) for name, t in inputs.items()})
                acc.backward(loss * scale)
            loss_sum += loss.detach() * (1.0 if mine else 0.0)
        if cfg.max_grad_norm:
            acc.clip_grad_norm_(run.model.parameters(), cfg.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        step_loss = acc.reduce(loss_sum, reduction="sum").item() / n_terms
        st.step += 1
        st.losses.append([st.step, step_loss])
        st.tokens += sum(lengths[i] for i in batch)
        st.train_s += time.perf_counter() - started
        if cfg.trace:
            with (run.run_dir / f"trace-rank{acc.process_index}.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": st.step, "examples": mine, "loss": step_loss}) + "\n")
        bar.update(1)
        if st.step % max(cfg.log_every, 1) == 0 or st.step == len(run.plan):
            recent = [v for _, v in st.losses[-cfg.log_every or -1:]]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", lr=f"{run.scheduler.get_last_lr()[0]:.2e}",
                            tok_s=f"{st.tokens / max(st.train_s, 1e-9):.0f}")
        if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < len(run.plan):
            periodic_eval(run)
        if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0 and st.step < len(run.plan):
            save_checkpoint(run)
    bar.close()


# ---------------------------------------------------------------- evaluation during and after training


def evaluate_dev(run: Run, limit: int, *, base: bool = False, final: bool = False) -> dict[str, dict[str, Any]]:
    """Score every dev set on the main process (the others wait); ``base``: with the adapter disabled.

    ``final``: also write each example's prediction to the run folder (predictions[-base]-DEV.jsonl, as
    ``lorabot eval --predictions`` does), so the final scores can be looked into without a second pass.
    """
    acc, scores = run.accelerator, {}
    if acc.is_main_process:
        peft, ev = run.peft, run.config.eval
        with peft.disable_adapter() if base else nullcontext():
            for name, examples in run.dev.items():
                subset = examples[:limit] if limit else examples
                records: list[dict[str, Any]] | None = [] if final else None  # periodic ones are not kept
                # Theme adherence (stories) generates 50 stories: at the final evaluation only, once.
                themes = final and name == next(iter(run.dev))
                scores[name] = evaluate(run.config.task, peft, run.tok, subset, labels=run.labels,
                                        batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                        max_length=run.config.train.max_length, predictions=records, themes=themes)
                if records:
                    write_jsonl(run.run_dir / f"predictions-{'base-' if base else ''}{name}.jsonl", records)
        run.model.train()
    acc.wait_for_everyone()
    return scores


def calibrate_dev(run: Run, calibration: dict[str, list[Example]]) -> dict[str, Any] | None:
    """Fit the label offsets (training/calibrate.py) and score every dev set with them, writing the
    predictions files as ``evaluate_dev(final=True)`` does; main process only (the others get None)."""
    report = None
    if run.accelerator.is_main_process:
        from training.calibrate import calibrate

        limit = run.config.eval.final_limit
        records: dict[str, list[dict[str, Any]]] = {}
        report = calibrate(run.peft, run.tok, run.labels, calibration,
                           {k: v[:limit] if limit else v for k, v in run.dev.items()},
                           batch_size=run.config.eval.batch_size, predictions=records)
        for name, rows in records.items():
            write_jsonl(run.run_dir / f"predictions-{name}.jsonl", rows)
        run.model.train()
    run.accelerator.wait_for_everyone()
    return report


def record_eval(run: Run, scores: dict[str, dict[str, Any]]) -> None:
    if not scores:
        return
    metric = PRIMARY[run.config.task]
    run.state.evals.append({"step": run.state.step, "scores": {k: v[metric] for k, v in scores.items()}})
    summary = ", ".join(f"{k} {metric} {v[metric]:.2f}" for k, v in scores.items())
    tqdm.write(f"step {run.state.step}: {summary}")


def periodic_eval(run: Run) -> None:
    """Score the dev sets (eval.limit examples each); with keep_best, remember the best weights so far.

    The selection score is the primary metric on the dev set named by ``train.best_of``, or by default
    its mean over the dev sets (so an adapter with two targets is not chosen for one of them alone).
    """
    scores = evaluate_dev(run, run.config.eval.limit)
    record_eval(run, scores)
    best_of = run.config.train.best_of
    if not run.config.train.keep_best or not run.accelerator.is_main_process:
        return
    metric, st = PRIMARY[run.config.task], run.state
    judged = [scores[best_of]] if best_of else list(scores.values())
    value = sum(v[metric] for v in judged) / len(judged)
    if st.best is None or (value > st.best["score"] if higher_is_better(run.config.task)
                           else value < st.best["score"]):
        checkpoint.save_best(run.run_dir, trainable_state(run.accelerator.unwrap_model(run.model)))
        st.best = {"step": st.step, "score": value}
        tqdm.write(f"step {st.step}: best so far ({metric} {value:.2f} on "
                   f"{best_of or 'the dev sets, averaged'})")


def restore_best(run: Run) -> None:
    """keep_best: score the last step like the others, then load the best weights if they came earlier."""
    st = run.state
    if not st.evals or st.evals[-1]["step"] != st.step:
        periodic_eval(run)
    if run.accelerator.is_main_process and st.best is not None and st.best["step"] != st.step:
        load_trainable_state(run.accelerator.unwrap_model(run.model), checkpoint.load_best(run.run_dir))
        tqdm.write(f"keeping the weights of step {st.best['step']} (the best dev evaluation)")
    run.accelerator.wait_for_everyone()


# ---------------------------------------------------------------- checkpoints


def save_checkpoint(run: Run) -> None:
    """Every process's RNG is gathered; the main process writes the checkpoint."""
    acc = run.accelerator
    rng = torch.get_rng_state().to(torch.int64).to(acc.device)
    gathered = acc.gather(rng.unsqueeze(0)).cpu()
    if acc.is_main_process:
        state = asdict(run.state) | {"fingerprint": fingerprint(run.config), "processes": acc.num_processes}
        checkpoint.save(
            run.run_dir, lora=trainable_state(acc.unwrap_model(run.model)), optimizer=run.optimizer.state_dict(),
            scheduler=run.scheduler.state_dict(), state=state,
            rng={f"torch_cpu.{r}": gathered[r].to(torch.uint8) for r in range(gathered.shape[0])},
        )
    acc.wait_for_everyone()


def restore(run_dir: Path, config: TrainConfig, loss_model: LossModel, optimizer: Any, scheduler: Any,
            rank: int) -> State:
    """Load the newest checkpoint into the (not yet prepared) model, optimizer and scheduler."""
    found = checkpoint.find(run_dir)
    if found is None:
        return State()
    saved = checkpoint.load(found)
    if saved["state"].get("fingerprint") != fingerprint(config):
        raise ConfigError(str(run_dir), ["the checkpoint was made with a different task, data, base model, LoRA "
                                         "or batch/length/lr settings; restore them or start a fresh run"])
    load_trainable_state(loss_model, saved["lora"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    rng = saved["rng"].get(f"torch_cpu.{rank}")
    if rng is not None:
        torch.set_rng_state(rng)
    known = {f.name for f in State.__dataclass_fields__.values()}  # type: ignore[attr-defined]
    return State(**{k: v for k, v in saved["state"].items() if k in known})


# ---------------------------------------------------------------- setup and output


def _schedule(total: int, warmup: int, min_ratio: float) -> Any:
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _threads(cfg: TrainSettings, processes: int) -> int:
    if cfg.threads:
        return cfg.threads
    # One process gets torch's default (all cores); data-parallel processes split the cores.
    return max(1, (os.cpu_count() or 1) // processes) if processes > 1 else torch.get_num_threads()


def train(config: TrainConfig, out: Path, train_examples: list[Example], dev: dict[str, list[Example]], *,
          labels: tuple[str, ...] = (), resume: bool = False, data_info: list[dict[str, Any]] | None = None,
          calibration: dict[str, list[Example]] | None = None) -> Path:
    """Train an adapter for ``config.task`` and write it to ``out`` (atomically); returns ``out``.

    ``calibration`` (sentiment): sets that fit the label offsets after training (training/calibrate.py);
    the dev scores written are then the ones with the offsets applied, as the bot decides."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # PEFT calls a transformers property that is deprecated in transformers 5; harmless here.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    task, cfg = config.task, config.train
    name = check_name(out)
    cuda = torch.cuda.is_available()
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32"
    acc = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda and cfg.dtype == "auto" else "no")
    torch.set_num_threads(_threads(cfg, acc.num_processes))
    set_seed(config.seed)
    run_dir = Path(cfg.run_dir or Path("runs") / name)
    if checkpoint.find(run_dir) and not resume:
        raise ConfigError(str(run_dir), ["holds a checkpoint of an earlier run: pass --resume to continue it, "
                                         "or delete the folder to start again"])
    if cfg.keep_best and not dev:
        raise ConfigError("train.keep_best", ["needs dev data to choose by (--dev or data.dev)"])
    if cfg.best_of and cfg.best_of not in dev:
        raise ConfigError("train.best_of", [f"no dev set named {cfg.best_of!r} (the dev sets: "
                                            f"{', '.join(dev) or 'none'})"])

    base, tok, ref = load_base(config.base, dtype=dtype, device=str(acc.device))
    encoded, skipped = encode(task, train_examples, tok, max_length=cfg.max_length, labels=labels)
    if not encoded:
        raise ConfigError("train.max_length", [f"all {len(train_examples)} training examples are longer than "
                                               f"{cfg.max_length} tokens"])
    peft = add_lora(base, config.lora)
    init = (init_from_adapter(peft, Path(cfg.init_adapter), task=task, lora=config.lora,
                              base_shape=shape_signature(base.config)) if cfg.init_adapter else None)
    loss_model = LossModel(peft, label_token_ids(tok, labels) if task == "sentiment" else ())
    params = [p for p in loss_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    lengths = [len(e.ids) for e in encoded]
    plan = [b for epoch in range(cfg.epochs) for b in length_grouped_batches(lengths, cfg.batch_size,
                                                                             config.seed, epoch)]
    plan = plan[: cfg.max_steps] if cfg.max_steps else plan
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _schedule(len(plan), round(cfg.warmup * len(plan)), cfg.min_lr_ratio))
    state = restore(run_dir, config, loss_model, optimizer, scheduler, acc.process_index) if resume else State()
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "recipe.toml").write_text(to_toml(config), encoding="utf-8")
        where = f"resuming at step {state.step}" if state.step else "starting"
        tqdm.write(f"{task}: {len(encoded)} examples ({skipped} too long, skipped), {len(plan)} steps, "
                   f"{acc.num_processes} process(es); {where}; checkpoints in {run_dir}")
    acc.wait_for_everyone()
    model, optimizer = acc.prepare(loss_model, optimizer)
    run = Run(config, acc, model, optimizer, scheduler, tok, encoded, plan, dev, labels, run_dir, state)

    fit(run)

    if cfg.checkpoint_every:
        save_checkpoint(run)  # the weights are safe even if the final evaluation fails
    if cfg.keep_best:
        restore_best(run)
    # With calibration data the offsets are fitted first and the dev sets scored with them, in one pass.
    # (Every process takes the same branch: both wait for the others at the end.)
    if calibration:
        report = calibrate_dev(run, calibration)
        scores = report["dev"] if report else {}
    else:
        report, scores = None, evaluate_dev(run, config.eval.final_limit, final=True)
    record_eval(run, scores)
    base_scores = (evaluate_dev(run, config.eval.final_limit, base=True, final=True)
                   if config.eval.base else {})
    if acc.is_main_process:
        train_info = _train_info(run, len(train_examples), skipped, dtype, init)
        metrics = {"task": task, "primary": PRIMARY[task], "dev": scores, "base": base_scores, "train": train_info,
                   "history": {"loss": state.losses, "eval": state.evals}} | ({"calibration": report} if report else {})

        def write(folder: Path) -> None:
            save_adapter(run.peft, folder, base_name=ref.name)
            manifest = manifest_dict(
                name=name, task=task, labels=list(labels), base_model=ref.name,
                base_shape=shape_signature(base.config), description=config.description,
                extra={"dev_scores": {k: v[PRIMARY[task]] for k, v in scores.items()}}
                | ({"label_offsets": report["offsets"]} if report else {}))
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
            (folder / "recipe.toml").write_text(to_toml(config), encoding="utf-8")
            plot_curves(folder / "curves.png", state.losses, state.evals, PRIMARY[task])
            write_card(folder / "README.md", name=name, config=config, base_name=ref.name, labels=list(labels),
                       data=data_info or [], train=train_info, scores=scores, base_scores=base_scores,
                       calibration=report)

        publish(out, write, base_model=ref.name, base_shape=shape_signature(base.config))
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n", encoding="utf-8")
        checkpoint.remove(run_dir)  # finished: a later --resume starts a new run
        tqdm.write(f"wrote {out} ({state.train_s:.0f} s training)")
    acc.wait_for_everyone()
    acc.end_training()
    return out


def _train_info(run: Run, n_examples: int, skipped: int, dtype: str, init: AdapterInfo | None) -> dict[str, Any]:
    import peft
    import transformers

    st, acc = run.state, run.accelerator
    return {
        "examples": len(run.encoded), "read": n_examples, "skipped": skipped, "steps": len(run.plan),
        "epochs": run.config.train.epochs, "tokens": sum(len(e.ids) for e in run.encoded),
        "tokens_seen": st.tokens, "time_s": st.train_s, "tokens_per_s": st.tokens / max(st.train_s, 1e-9),
        "final_loss": st.losses[-1][1] if st.losses else None, "processes": acc.num_processes,
        "kept_step": st.best["step"] if st.best else len(run.plan),
        **({"init_adapter": _stage_before(init)} if init else {}),
        "threads": torch.get_num_threads(), "dtype": dtype, "device": str(acc.device),
        "machine": f"{_cpu_name()} ({os.cpu_count()} cores, {acc.device})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
    }


def _stage_before(init: AdapterInfo) -> dict[str, Any]:
    """The starting adapter of a continued run and, from its metrics.json, what training it had."""
    earlier = init.metrics.get("train")
    keys = ("read", "examples", "steps", "time_s")
    # An adapter from elsewhere need not carry lorabot's metrics: then only its path is known.
    known = isinstance(earlier, dict) and all(k in earlier for k in keys)
    if not known:
        return {"path": str(init.path)}
    # A starting adapter that was itself continued carries its own stage before: keep the whole chain.
    chain = {"init_adapter": earlier["init_adapter"]} if isinstance(earlier.get("init_adapter"), dict) else {}
    return {"path": str(init.path)} | {k: earlier[k] for k in keys} | chain


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

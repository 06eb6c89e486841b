"""The adapter's model card (README.md) and training curves (curves.png)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from bot.skills import SKILLS
from training.calibrate import card_section
from training.config import TrainConfig, to_toml
from training.evaluate import PRIMARY


def plot_curves(path: Path, losses: list[list[float]], evals: list[dict[str, Any]], metric: str) -> None:
    """Training loss per step and the dev metric at each evaluation, one panel each."""
    import matplotlib

    matplotlib.use("Agg")  # no display; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    if losses:
        ax1.plot([s for s, _ in losses], [v for _, v in losses], lw=1)
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    names = sorted({k for e in evals for k in e["scores"]})
    for name in names:
        points = [(e["step"], e["scores"][name]) for e in evals if name in e["scores"]]
        ax2.plot([s for s, _ in points], [v for _, v in points], marker="o", label=name)
    ax2.set(xlabel="step", ylabel=metric, title=f"dev {metric}")
    if names:
        ax2.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _score_rows(task: str, adapter: dict[str, Any], base: dict[str, Any]) -> list[str]:
    keys = {"sentiment": ["accuracy", "macro_f1", "macro_recall"], "ner": ["f1", "precision", "recall"],
            "qa": ["exact_match", "f1"], "story": ["perplexity", "theme_adherence"]}.get(task, ["perplexity"])
    rows = ["| dev data | n | metric | adapter | base model |", "|---|---:|---|---:|---:|"]
    for name, scores in adapter.items():
        for key in (k for k in keys if k in scores):
            b = base.get(name, {}).get(key, "not measured")
            rows.append(f"| {name} | {scores.get('n', '')} | {key} | {_fmt(scores.get(key))} | {_fmt(b)} |")
    return rows


def _init_line(init: dict[str, Any]) -> str:
    """Continued fine-tuning: name the starting adapter and what it cost, so the total stays visible."""
    return (f"- started from the weights of {_stages(init)}, not a fresh LoRA (train.init_adapter); "
            "the time above is this run's only")


def _stages(init: dict[str, Any]) -> str:
    """The starting adapter, what it cost, and (when it was continued too) the stages before it."""
    before = (f" ({init['examples']} examples, {init['steps']} steps, {init['time_s'] / 60:.1f} min of training)"
              if "time_s" in init else "")
    earlier = init.get("init_adapter")
    return f"`{init['path']}`{before}" + (f", itself started from {_stages(earlier)}" if earlier else "")


# The generated card's last line: what a later rewrite (training/rescore.py) keeps after it was added by hand.
CARD_END = "Curves: `curves.png`; all figures: `metrics.json`."

# How a task's outputs are decided, when that is more than the task's format says: as the bot decides them.
HOW_SCORED = {
    "qa": (" Answers are decoded as the bot decodes them: spans of the context, with the order check (a second"
           " reading with the sentences reversed, `[qa] order_check`; `bot/qa_answer.py`)."),
}


def write_card(path: Path, *, name: str, config: TrainConfig, base_name: str, labels: list[str],
               data: list[dict[str, Any]], train: dict[str, Any], scores: dict[str, Any],
               base_scores: dict[str, Any], calibration: dict[str, Any] | None = None) -> None:
    """README.md: what the adapter does, its data, hyper-parameters, cost and measured scores."""
    task = config.task
    skill = next((s for s in SKILLS.values() if s.task == task), None)
    minutes = train["time_s"] / 60
    lines = [
        f"# {name}", "",
        f"A LoRA adapter for **{task}** on `{base_name}`, made by `lorabot train`."
        + (f" Use it in the bot with `{skill.usage}`." if skill else ""),
        *(["", config.description] if config.description else []),
        "",
        "## Data", "",
        "| file | part | examples used |", "|---|---|---:|",
        *[f"| `{d['path']}` | {d['part']} | {d['examples']} |" for d in data],
        "",
        f"Training: {train['examples']} examples ({train['skipped']} longer than max_length skipped), "
        f"{train['tokens']} tokens per epoch, {train['epochs']} epoch(s), {train['steps']} optimizer steps.",
        *(["", f"Labels: {', '.join(labels)}."] if labels else []),
        "",
        "## Scores on the dev data", "",
        f"The adapter and the bare base model, scored the same way on the same examples "
        f"(primary metric: {PRIMARY[task]}).{HOW_SCORED.get(task, '')}", "",
        *_score_rows(task, scores, base_scores),
        "",
        *([*card_section(calibration), ""] if calibration else []),
        "## Training", "",
        f"- time: {train['time_s']:.0f} s ({minutes:.1f} min) on {train['machine']}, "
        f"{train['processes']} process(es) x {train['threads']} thread(s), {train['dtype']}",
        f"- throughput: {train['tokens_per_s']:.0f} tokens/s (prompt + answer tokens)",
        f"- final training loss: {_fmt(train['final_loss'])}",
        *([f"- weights: step {train['kept_step']} of {train['steps']}, the best periodic dev evaluation "
           "(train.keep_best)"] if train.get("kept_step", train["steps"]) != train["steps"] else []),
        *([_init_line(train["init_adapter"])] if train.get("init_adapter") else []),
        f"- LoRA: r={config.lora.r}, alpha={config.lora.alpha}, dropout={config.lora.dropout}, "
        f"on {', '.join(config.lora.target_modules)}; weights stored in bfloat16",
        f"- versions: torch {train['versions']['torch']}, transformers {train['versions']['transformers']}, "
        f"peft {train['versions']['peft']}, Python {platform.python_version()}",
        "", "Resolved configuration (`recipe.toml` in this folder):", "", "```toml", to_toml(config).rstrip(), "```",
        "", CARD_END, "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")

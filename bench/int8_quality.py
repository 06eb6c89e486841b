"""What the opt-in int8 activations (``engine.int8_activations``) cost in quality: dev scores through the engine.

    .venv/bin/python -m bench.int8_quality [--n 150]

The approximate path only changes decode steps of one or two rows (larger batches keep float32: it is not
faster there), so requests run one at a time here, as a single user's would. For NER (CoNLL-2003 dev) and
QA (the SQuAD holdout the qa adapter is scored on, answers decoded as spans of the context as the bot does)
the same first ``--n`` examples go through ``LocalEngine`` with the shipped adapters, exact and int8, scored
with the evaluation's own metrics; plus how many outputs are identical. Skips cleanly without
../shared/data. Results: bench/results/int8_quality.json.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import write_result

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
NER_DEV = DATA / "ner" / "conll2003_dev.txt"
QA_DEV = DATA / "qa" / "squad_v1.1_dev_shared.jsonl"


async def score(int8: bool, n: int) -> dict[str, Any]:
    from bot.config import load_config, replace
    from bot.engine import SamplingParams
    from bot.engine.scheduler import LocalEngine
    from bot.skills import NERFormat, QAFormat
    from training import data as D
    from training.dataspec import DataSpec
    from training.evaluate import entities_to_tags, ner_metrics, qa_metrics

    config = replace(load_config(REPO / "config.toml"), engine={"int8_activations": int8, "max_batch": 1})
    engine = await asyncio.to_thread(LocalEngine.from_config, config, progress=False)
    try:
        ner = D.load("ner", DataSpec(str(NER_DEV)), NERFormat.default_labels, seed=0)[:n]
        qa = D.load("qa", DataSpec(str(QA_DEV), holdout=0.15, part="holdout"), (), seed=0)[:n]
        started = time.perf_counter()
        ner_out, gold, pred = [], [], []
        for ex in ner:
            g = await engine.generate(NERFormat.prompt(ex.text), SamplingParams(max_new_tokens=96,
                                                                                stop=NERFormat.stop), "ner")
            found = NERFormat.result(g.text, ex.text, NERFormat.default_labels).entities
            ner_out.append(g.text)
            gold.append(list(ex.tags))
            pred.append(entities_to_tags(ex.tokens, [(e.start, e.end, e.type) for e in found]))
        qa_out, answers = [], []
        for ex in qa:
            params = SamplingParams(max_new_tokens=24, stop=QAFormat.stop, span_of=QAFormat.span_source(ex.context))
            g = await engine.generate(QAFormat.prompt(ex.context, ex.question), params, "qa")
            qa_out.append(g.text)
            answers.append(QAFormat.result(g.text, ex.context).answer)
        return {"ner_f1": round(ner_metrics(gold, pred)["f1"], 2),
                "qa": {k: round(v, 2) for k, v in qa_metrics(answers, [ex.answers for ex in qa]).items()},
                "seconds": round(time.perf_counter() - started, 1), "outputs": {"ner": ner_out, "qa": qa_out}}
    finally:
        await engine.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=150, help="examples per task")
    args = parser.parse_args(argv)
    if not (NER_DEV.is_file() and QA_DEV.is_file()):
        print(f"skipped: {DATA} is not here")
        return 0
    exact, int8 = (asyncio.run(score(mode, args.n)) for mode in (False, True))
    same = {task: sum(a == b for a, b in zip(exact["outputs"][task], int8["outputs"][task], strict=True))
            for task in ("ner", "qa")}
    result = {"n": args.n, "exact": {k: v for k, v in exact.items() if k != "outputs"},
              "int8": {k: v for k, v in int8.items() if k != "outputs"}, "identical_outputs": same}
    path = write_result("int8_quality", result)
    for mode in ("exact", "int8"):
        r = result[mode]
        print(f"{mode:6} NER F1 {r['ner_f1']:6.2f}  QA F1 {r['qa']['f1']:6.2f} EM {r['qa']['exact_match']:6.2f}  "
              f"({r['seconds']} s)")
    print(f"identical outputs: NER {same['ner']}/{args.n}, QA {same['qa']}/{args.n}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""bench/load.py --via transports, small: the whole harness (both client stacks on loopback, /reload with an
adapter swapped mid-run, a second process writing the same database) on the tiny model, so the long
real-model run in the README cannot silently rot. Its checks are the bench's own: nothing lost, every
message answered or refused with a reason, what users saw is what the log holds."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.load import plan
from bench.load_transports import measure_transports
from bot.config import Config, replace


def _rss() -> float:
    return 0.0


async def test_the_transport_load_harness_finds_nothing_lost(tmp_path: Path, tiny_base: Path,
                                                            tiny_adapters: Path) -> None:
    config = replace(Config(root=tmp_path), model={"base": str(tiny_base), "dtype": "float32"},
                     adapters={"dir": str(tiny_adapters)}, store={"path": str(tmp_path / "load.db")},
                     access={"rate_limit_per_minute": 0}, generation={"max_new_tokens": 8},
                     story={"max_new_tokens": 8})
    args = argparse.Namespace(users=8, groups=2, in_flight=8, max_new_tokens=8, seed=1, time_limit=240)
    result = await measure_transports(config, args, plan(36, 8, 2, seed=1), _rss)
    assert result["checks"]["problems"] == []
    assert result["ok"]
    assert result["checks"]["sent"] == 36 + 2                   # the load and two admin /reloads
    assert result["second_writer_rows"] > 0
    assert all(text.startswith("Adapters:") for text in result["admin_replies"])
    assert (tiny_adapters / "sentiment").is_dir()               # the swap happened on a copy

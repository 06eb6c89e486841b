"""Load test on the real bundled model: many users, mixed skills and chats, through the real core, engine
and a temporary SQLite file; then verify that nothing was lost.

    .venv/bin/python -m bench.load [--messages 2000] [--users 200] [--concurrency 32] [--time-limit 3600]
    .venv/bin/python -m bench.load --via transports [--in-flight 48] ...   (see bench/load_transports.py)

Every message is handed to ``Core.handle`` (at most ``--concurrency`` at a time, one at a time per chat
like the transports do). Afterwards the database is read back with its own connection and checked:
every message sent is stored, every one was answered or refused with a reason, every reply returned is
stored with the same text, nothing is left pending (unless the time limit cut it off, in which case it is
reported, still visible as 'pending'). RSS is sampled before, during and after the run. Results go to
bench/results/load.json and a table is printed. Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sqlite3
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import rss_mb, summary, write_result
from bot.config import Config, load_config, replace
from bot.messages import Incoming, Reply

REPO = Path(__file__).resolve().parents[1]
CONTEXT = ("The Eiffel Tower is a wrought-iron lattice tower in Paris, France. It was designed by Gustave "
           "Eiffel's company and completed in 1889.")
# (skill label, message text, weight). Labels group the latency figures; refusals are part of the mix on
# purpose: they must come back with a reason and be logged as 'refused', like any other outcome.
MIX: list[tuple[str, str, int]] = [
    ("sentiment", "/sentiment The film was {adj}, I would {verb} watch it again.", 25),
    ("ner", "/ner {name} met {other} in {city} to talk about the budget.", 15),
    ("qa", "/ask Where is the Eiffel Tower? | " + CONTEXT, 15),
    ("chat", "What is a good name for a {adj} cat?", 20),
    ("story", "/story a {adj} mouse who wanted to fly", 8),
    ("compare", "/compare sentiment It was {adj}.", 5),
    ("command", "/help", 4),
    ("command", "/mode sentiment", 2),
    ("refusal", "/ask no context given here", 3),
    ("refusal", "/frobnicate now", 3),
]
WORDS = {"adj": ["wonderful", "dull", "brave", "strange", "quiet"], "verb": ["happily", "never", "gladly"],
         "name": ["Angela Merkel", "Ada Lovelace", "Alan Turing"], "other": ["Emmanuel Macron", "Grace Hopper"],
         "city": ["Paris", "Berlin", "London"]}


@dataclass
class Planned:
    n: int
    skill: str
    msg: Incoming


@dataclass
class Outcome:
    planned: Planned
    reply: Reply | None = None
    error: str | None = None
    ms: float = 0.0


@dataclass
class Run:
    outcomes: list[Outcome] = field(default_factory=list)
    not_sent: int = 0
    cut_off: int = 0
    rss_samples: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def plan(messages: int, users: int, groups: int, seed: int) -> list[Planned]:
    """A reproducible mix: users talk in their DM or in one of a few busy group chats."""
    rng = random.Random(seed)
    labels, texts, weights = zip(*MIX, strict=True)
    out = []
    for n in range(messages):
        i = rng.choices(range(len(MIX)), weights)[0]
        user = rng.randrange(users)
        in_group = user % 3 == 0  # a third of the users talk in groups, where they always address the bot
        chat = f"group{user % groups}" if in_group else f"dm{user}"
        text = texts[i].format(**{k: rng.choice(v) for k, v in WORDS.items()})
        msg = Incoming(platform="bench", chat_id=chat, user_id=f"u{user}", user_name=f"User {user}", text=text,
                       message_id=str(n), is_group=in_group, addressed=True)
        out.append(Planned(n, labels[i], msg))
    return out


async def drive(core: Any, planned: list[Planned], concurrency: int, time_limit: float) -> Run:
    run = Run()
    gate = asyncio.Semaphore(concurrency)
    locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
    deadline = time.monotonic() + time_limit
    started = time.perf_counter()

    async def one(p: Planned) -> None:
        async with gate, locks[p.msg.chat_id]:  # like the transports: one message at a time per chat
            if time.monotonic() >= deadline:
                return  # counted as not sent below
            outcome = Outcome(p)
            run.outcomes.append(outcome)
            t = time.perf_counter()
            try:
                outcome.reply = await core.handle(p.msg)
            except asyncio.CancelledError:
                outcome.error = "cut off by the time limit"
                run.cut_off += 1
                raise
            except Exception as exc:  # a crash of the core is a finding, not a reason to stop the run
                outcome.error = f"{type(exc).__name__}: {exc}"
            outcome.ms = (time.perf_counter() - t) * 1000

    async def sample() -> None:
        while True:
            run.rss_samples.append(rss_mb())
            await asyncio.sleep(1.0)

    sampler = asyncio.create_task(sample())
    tasks = [asyncio.create_task(one(p)) for p in planned]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    for task in pending:  # the hard limit: whatever is still running is cancelled and reported
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    run.not_sent = len(planned) - len(run.outcomes)
    sampler.cancel()
    run.wall_s = time.perf_counter() - started
    return run


def verify(db: Path, run: Run) -> dict[str, Any]:
    """Read the log back with a fresh connection and check every message and reply against it."""
    conn = sqlite3.connect(db)
    try:
        # Only the load's own rows (the warm-up chat is on another platform).
        incoming = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT m.platform_message_id, m.status, m.id FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE m.direction = 'in' AND c.platform = 'bench'")}
        outgoing = {r[0]: (r[1], r[2]) for r in conn.execute(
            "SELECT m.id, m.text, m.reply_to FROM messages m JOIN chats c ON c.id = m.chat_id "
            "WHERE m.direction = 'out' AND c.platform = 'bench'")}
        integrity = conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()
    problems: list[str] = []
    kinds: Counter[str] = Counter()
    for o in run.outcomes:
        key = o.planned.msg.message_id
        if o.error:
            kinds["crash" if "time limit" not in o.error else "cut_off"] += 1
            if "time limit" not in o.error:
                problems.append(f"message {key}: {o.error}")
            # A cut-off message is stored as 'pending', or settled if its last write was already under
            # way (the store finishes a write its caller stopped waiting for); either way it is visible.
            continue
        reply = o.reply
        if reply is None:
            problems.append(f"message {key}: no reply (the core stayed silent)")
            continue
        kinds[reply.kind] += 1
        if key not in incoming:
            problems.append(f"message {key}: not stored (lost)")
            continue
        status, in_id = incoming[key]
        expected = {"answer": "answered", "command": "answered", "refusal": "refused", "error": "failed"}[reply.kind]
        if status != expected:
            problems.append(f"message {key}: stored as {status}, reply kind {reply.kind}")
        if reply.kind == "refusal" and len(reply.text.strip()) < 10:
            problems.append(f"message {key}: refused without a reason")
        if reply.kind == "error":
            problems.append(f"message {key}: failed: {reply.text}")
        stored = outgoing.get(reply.message_id or -1)
        if stored is None or stored != (reply.text, in_id):
            problems.append(f"message {key}: reply not stored as sent")
    sent = len(run.outcomes)
    lost = sum(1 for o in run.outcomes if o.planned.msg.message_id not in incoming and
               not (o.error and "time limit" in o.error))
    pending = sum(1 for status, _ in incoming.values() if status == "pending")
    if pending > kinds["cut_off"]:
        problems.append(f"{pending} message(s) pending, only {kinds['cut_off']} cut off by the time limit")
    if integrity != "ok":
        problems.append(f"integrity_check: {integrity}")
    return {"sent": sent, "stored_incoming": len(incoming), "stored_replies": len(outgoing), "lost": lost,
            "pending": pending, "kinds": dict(kinds), "integrity": integrity, "problems": problems[:50],
            "problem_count": len(problems)}


async def measure(config: Config, args: argparse.Namespace) -> dict[str, Any]:
    from bot.app import load_engine, open_app

    started = time.perf_counter()
    engine = await asyncio.to_thread(load_engine, config, progress=False)
    load_s = time.perf_counter() - started
    planned = plan(args.messages, args.users, args.groups, args.seed)
    async with open_app(config, engine=engine) as app:
        # Warm-up outside the measurement (first calls allocate caches and kernels).
        for text in ("/sentiment warm up", "/ner Warm Up", "/chat hi"):
            await app.core.handle(Incoming(platform="bench-warmup", chat_id="w", user_id="w", text=text))
        rss_before = rss_mb()
        run = await drive(app.core, planned, args.concurrency, args.time_limit)
        rss_after = rss_mb()
    checks = verify(config.path(config.store.path), run)
    by_skill: dict[str, list[float]] = defaultdict(list)
    for o in run.outcomes:
        if o.reply is not None:
            by_skill[o.planned.skill].append(o.ms)
    growth = rss_after - rss_before
    return {
        "settings": {"messages": args.messages, "users": args.users, "groups": args.groups,
                     "concurrency": args.concurrency, "time_limit_s": args.time_limit,
                     "max_new_tokens": args.max_new_tokens,
                     "rate_limit_per_minute": config.access.rate_limit_per_minute,
                     "adapters": sorted(engine.adapters), "seed": args.seed},
        "engine_load_s": round(load_s, 1),
        "wall_s": round(run.wall_s, 1),
        "throughput_msg_s": round(len(run.outcomes) / run.wall_s, 2) if run.wall_s else None,
        "not_sent_time_limit": run.not_sent,
        "latency": {skill: summary(ms) for skill, ms in sorted(by_skill.items())},
        "rss_mb": {"before": round(rss_before, 1), "after": round(rss_after, 1), "growth": round(growth, 1),
                   "peak": round(max(run.rss_samples, default=rss_after), 1)},
        # "Flat": the run adds less than 10% (at least 64 MB of slack for allocator noise and caches).
        "memory_flat": growth < max(64.0, 0.10 * rss_before),
        "checks": checks,
        "ok": checks["problem_count"] == 0 and checks["lost"] == 0,
    }


def print_table(result: dict[str, Any]) -> None:
    s, c = result["settings"], result["checks"]
    print(f"load: {c['sent']} of {s['messages']} messages sent from {s['users']} users, concurrency "
          f"{s['concurrency']}, in {result['wall_s']} s ({result['throughput_msg_s']} msg/s); "
          f"adapters: {', '.join(s['adapters']) or 'none (bare base model)'}")
    print(f"{'skill':10} {'n':>6} {'p50 ms':>9} {'p95 ms':>9}")
    for skill, stats in result["latency"].items():
        print(f"{skill:10} {stats['runs']:6d} {stats['p50_ms']:9.1f} {stats['p95_ms']:9.1f}")
    print(f"outcomes: {json.dumps(c['kinds'])}")
    print(f"stored: {c['stored_incoming']} messages, {c['stored_replies']} replies; lost {c['lost']}; "
          f"pending {c['pending']}; not sent (time limit) {result['not_sent_time_limit']}; "
          f"integrity {c['integrity']}")
    r = result["rss_mb"]
    print(f"RSS MB: before {r['before']}, after {r['after']}, peak {r['peak']}, growth {r['growth']} "
          f"({'flat' if result['memory_flat'] else 'GROWING'})")
    for problem in c["problems"]:
        print(f"PROBLEM {problem}")
    print("OK" if result["ok"] else f"FAILED: {c['problem_count']} problem(s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--groups", type=int, default=5, help="group chats shared by a third of the users")
    parser.add_argument("--concurrency", type=int, default=32, help="messages in flight at most")
    parser.add_argument("--time-limit", type=float, default=3600, help="hard limit in seconds for the load phase")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="chat and story generation length")
    parser.add_argument("--rate-limit", type=int, default=None, help="per-user messages/minute (default: config)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", default=str(REPO / "config.toml"))
    parser.add_argument("--via", choices=("core", "transports"), default="core",
                        help="core: Core.handle directly; transports: the Telegram and Discord client stacks "
                             "on loopback, with /reload, an adapter swap and a second writer during the run")
    parser.add_argument("--in-flight", type=int, default=48, help="--via transports: unanswered messages at most")
    args = parser.parse_args()
    if min(args.messages, args.users, args.groups, args.concurrency, args.max_new_tokens) < 1 or args.time_limit <= 0:
        parser.error("counts, --max-new-tokens and --time-limit must be positive")
    base = load_config(args.config) if Path(args.config).is_file() else Config(root=REPO)
    with tempfile.TemporaryDirectory() as tmp:
        access = {} if args.rate_limit is None else {"rate_limit_per_minute": args.rate_limit}
        config = replace(base, store={"path": str(Path(tmp) / "load.db"), "retention_days": 0}, access=access,
                         generation={"max_new_tokens": args.max_new_tokens},
                         story={"max_new_tokens": args.max_new_tokens})
        if args.via == "transports":
            from bench.load_transports import measure_transports

            if args.rate_limit is None:
                config = replace(config, access={"rate_limit_per_minute": 0})
            planned = plan(args.messages, args.users, args.groups, args.seed)
            result = asyncio.run(measure_transports(config, args, planned, rss_mb))
        else:
            result = asyncio.run(measure(config, args))
    path = write_result("load" if args.via == "core" else "load_transports", result)
    if args.via == "core":
        print_table(result)
    else:
        print(json.dumps({k: v for k, v in result.items() if k != "settings"}, indent=1))
    print(f"wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

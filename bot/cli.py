"""The ``lorabot`` command: chat, run, ask, serve, adapters, db, doctor, and (from training/) train, eval, export.

Heavy modules are imported inside the commands, so ``lorabot --help`` answers instantly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from bot.config import Config, load_config
from bot.errors import LorabotError

log = logging.getLogger("lorabot")

def setup_logging(config: Config, verbose: int) -> None:
    level = logging.WARNING - 10 * min(verbose, 2)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    from bot.transports.common import register_secret

    # Bot tokens must never reach a log line, whoever logs them (HTTP libraries log request URLs).
    for platform in ("telegram", "discord"):
        register_secret(config.token(platform) or "")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Third-party chatter (HTTP request lines with URLs) only at -vv.
    for noisy in ("httpx", "httpcore", "telegram", "discord", "transformers", "peft", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


# --------------------------------------------------------------------------- commands
async def _chat(config: Config) -> int:
    from bot.app import open_app
    from bot.transports.console import console_chat

    async with open_app(config) as app:
        await console_chat(app.core)
    return 0


async def _run(config: Config) -> int:
    from bot.app import open_app, run_transports

    tokens = {p: config.token(p) for p in ("telegram", "discord")}
    if not any(tokens.values()):
        print(
            "No bot token is set, so lorabot starts as a console chat.\n"
            f"  Telegram: create a bot with @BotFather, then `export {config.telegram.token_env}=<token>`\n"
            f"  Discord:  create an application at discord.com/developers, then "
            f"`export {config.discord.token_env}=<token>`\n"
            "and run `make run` (or `lorabot run`) again. See README.md for details.",
            file=sys.stderr,
        )
        return await _chat(config)
    async with open_app(config) as app:
        transports: list[Any] = []
        if tokens["telegram"]:
            from bot.transports.telegram_chat import TelegramTransport

            transports.append(TelegramTransport(app.core, config, tokens["telegram"]))
        if tokens["discord"]:
            from bot.transports.discord_chat import DiscordTransport

            transports.append(DiscordTransport(app.core, config, tokens["discord"]))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            # Non-zero when a platform connection was lost for good: better restarted than up and deaf.
            status = await run_transports(transports, stop)
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            unanswered = await app.store.unanswered()
            if unanswered:
                log.warning("%d message(s) were left unanswered at shutdown (kept as 'pending')", len(unanswered))
    return status


def _read_context(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        try:
            return path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise LorabotError(f"cannot read context file {path}: {exc.strerror}") from None
    return value


async def _ask(config: Config, args: argparse.Namespace) -> int:
    from bot.app import open_app
    from bot.ask import ask

    context = _read_context(args.context)
    async with open_app(config, progress=not args.json) as app:
        reply = await ask(app.core, args.skill, args.text, context=context, compare=args.compare,
                          platform="cli", chat_id="cli", user_id=os.environ.get("USER") or "cli")
    if reply is None:
        return 1
    if args.json:
        print(json.dumps(reply.to_json(), ensure_ascii=False))
    else:
        print(reply.text)
    return 0 if reply.kind in ("answer", "command") else 2


async def _serve(config: Config, args: argparse.Namespace) -> int:
    from bot.serve.app import serve
    from bot.serve.settings import ServeSettings, api_key_from_env

    settings = ServeSettings(
        host=args.host, port=args.port, api_key=api_key_from_env(args.api_key_env),
        max_in_flight=args.max_in_flight, max_body_bytes=args.max_body_kb * 1024,
        max_prompt_chars=args.max_prompt_chars,
    )
    return await serve(config, settings)


def _adapters(config: Config, args: argparse.Namespace) -> int:
    from bot.adapters import scan_adapters
    from bot.engine import base_signature

    name, shape = base_signature(config)
    found, problems = scan_adapters(config.path(config.adapters.dir), base_model=name, base_shape=shape)
    for info in found.values():
        labels = f" labels={','.join(info.labels)}" if info.labels else ""
        print(f"{info.name:16} task={info.task} format=v{info.format_version} r={info.rank}{labels}")
    for problem in problems:
        print(f"NOT LOADED {problem}", file=sys.stderr)
    return 1 if problems and args.check else 0


def _export_gguf(config: Config, args: argparse.Namespace) -> int:
    from bot.adapter_gguf import export_gguf

    named = config.path(config.adapters.dir) / args.adapter
    folder = named if "/" not in args.adapter and named.is_dir() else Path(args.adapter)
    if not folder.is_dir():
        raise LorabotError(f"no adapter folder {args.adapter!r} (neither in {config.adapters.dir}/ nor a path)")
    done = export_gguf(folder, Path(args.out))
    print(f"wrote {done.path} ({done.tensors} tensors, r={done.rank}, alpha={done.alpha:g}, "
          f"{done.bytes / 2**20:.1f} MB); llama.cpp: --lora {done.path}")
    return 0


def _db(config: Config, args: argparse.Namespace) -> int:
    from bot.store import Store

    path = Path(args.db) if args.db else config.path(config.store.path)
    if not path.exists():
        raise LorabotError(f"no database at {path}")
    # Inspection only reads: it must work on a read-only copy (a backup, a read-only volume).
    store = Store.open(path, read_only=args.action in ("stats", "check", "export", "unanswered"))
    try:
        if args.action == "stats":
            print(json.dumps(store.stats(), indent=2, ensure_ascii=False))
        elif args.action == "check":
            result = store.integrity_check()
            print(result)
            return 0 if result == "ok" else 1
        elif args.action == "vacuum":
            store.vacuum()
            print(f"vacuumed {path}")
        elif args.action == "purge":
            print(f"removed {store.purge_older_than(args.days)} messages older than {args.days} days")
        elif args.action == "unanswered":
            for row in store.unanswered():
                print(json.dumps(row, ensure_ascii=False, default=str))
        elif args.action == "export":
            out = Path(args.out) if args.out else None
            examples = store.export_chat_examples(only_positive_feedback=args.only_positive_feedback)
            lines = [json.dumps(e, ensure_ascii=False) for e in examples]
            if out:
                try:
                    out.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
                except OSError as exc:
                    raise LorabotError(f"cannot write {out}: {exc.strerror or exc}") from None
                print(f"wrote {len(lines)} conversations to {out}")
            else:
                print("\n".join(lines))
    finally:
        store.close()
    return 0


# --------------------------------------------------------------------------- parser
def _days(value: str) -> int:
    days = int(value)
    if days < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {days}")
    return days


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorabot", description="One small language model, specialised per task with LoRA adapters.",
    )
    parser.add_argument("--config", help="config file (default: ./config.toml if present)")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: library logs too)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("chat", help="chat in this terminal (also reads piped stdin, one message per line)")
    sub.add_parser("run", help="run on Telegram/Discord where a token is set; else the console chat")
    ask = sub.add_parser("ask", help="one-shot: run one skill on one text")
    ask.add_argument("skill", help="chat, sentiment, ner, qa, story, or an adapter name")
    ask.add_argument("text")
    ask.add_argument("--context", help="qa: the text to answer from (a string or a file path)")
    ask.add_argument("--compare", action="store_true", help="also show the bare base model's answer")
    ask.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    serve = sub.add_parser("serve", help="an OpenAI-compatible HTTP API and a try-it page over the adapters")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    serve.add_argument("--port", type=int, default=8000, help="port (0: any free one; the start line says which)")
    serve.add_argument("--api-key-env", metavar="NAME",
                       help="environment variable holding the API key clients send as a Bearer token "
                            "(required for a non-loopback --host; also needed to load/unload adapters)")
    serve.add_argument("--max-in-flight", type=int, default=64, help="model requests at once; more get 429")
    serve.add_argument("--max-body-kb", type=int, default=1024, help="largest request body accepted")
    serve.add_argument("--max-prompt-chars", type=int, default=32_000, help="longest prompt accepted")
    adapters = sub.add_parser("adapters", help="list the adapters and why any are not loaded")
    adapters.add_argument("--check", action="store_true", help="exit 1 if any adapter folder is invalid")
    export = sub.add_parser("export-gguf", help="write an adapter as a GGUF LoRA for llama.cpp and Ollama")
    export.add_argument("adapter", help="an adapter's name (in the adapters folder) or its folder")
    export.add_argument("--out", required=True, help="the .gguf file to write")
    doctor = sub.add_parser("doctor", help="what this installation will use (paste it into bug reports)")
    doctor.add_argument("--json", action="store_true", help="one JSON object")
    db = sub.add_parser("db", help="the conversation database: stats, check, export, vacuum, purge")
    db.add_argument("action", choices=["stats", "check", "export", "vacuum", "purge", "unanswered"])
    db.add_argument("--db", help="database file (default: [store] path)")
    db.add_argument("--days", type=_days, default=30, help="purge: remove messages older than this")
    db.add_argument("--out", help="export: JSONL file to write (default: stdout)")
    db.add_argument("--only-positive-feedback", action="store_true")
    try:
        from training.cli import add_commands
    except ImportError:  # the training package is optional for a bot-only install
        pass
    else:
        add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
        setup_logging(config, args.verbose)
        if args.command == "chat":
            return asyncio.run(_chat(config))
        if args.command == "run":
            return asyncio.run(_run(config))
        if args.command == "ask":
            return asyncio.run(_ask(config, args))
        if args.command == "serve":
            return asyncio.run(_serve(config, args))
        if args.command == "adapters":
            return _adapters(config, args)
        if args.command == "db":
            return _db(config, args)
        if args.command == "export-gguf":
            return _export_gguf(config, args)
        if args.command == "doctor":
            from bot import doctor

            print(doctor.render(doctor.report(config), as_json=args.json))
            return 0
        return int(args.func(args) or 0)
    except LorabotError as exc:
        print(f"lorabot: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

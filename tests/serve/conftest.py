"""``lorabot serve`` for the tests: the real application over a real engine and SQLite log, on a free loopback
port, in a thread with its own event loop (as a separate server process would be), or as the real command.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bot.config import Config, load_config
from bot.serve.settings import ServeSettings

REPO = Path(__file__).resolve().parents[2]
API_KEY = "test-key-7f3a9c"


def write_config(path: Path, base: Path, adapters: Path, db: Path, extra: str = "", story_tokens: int = 12) -> Path:
    """A config on the tiny model: greedy everywhere (results comparable token for token), short answers."""
    path.write_text(
        f'[model]\nbase = "{base}"\ndtype = "float32"\n[adapters]\ndir = "{adapters}"\n[store]\npath = "{db}"\n'
        f"[story]\nmax_new_tokens = {story_tokens}\ntemperature = 0.0\n"
        "[generation]\nmax_new_tokens = 12\ntemperature = 0.0\n[ner]\nmax_new_tokens = 24\n[qa]\nmax_new_tokens = 12\n"
        + extra, encoding="utf-8")
    return path


class LiveServer:
    """The serve application over its own engine and store, listening on 127.0.0.1:<free port>."""

    def __init__(self, config: Config, settings: ServeSettings | None = None):
        self.config = config
        self.settings = settings or ServeSettings(port=0)
        self.loop = asyncio.new_event_loop()
        self.url = ""
        self.engine: Any = None
        self.app: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)

    async def _main(self) -> None:
        from bot.app import open_app
        from bot.serve.app import build_app, running

        self._stop = asyncio.Event()
        try:
            async with open_app(self.config, progress=False) as bot:
                self.app = build_app(self.config, bot.engine, bot.store, self.settings)
                async with running(self.app, self.settings) as url:
                    self.url, self.engine = url, bot.engine
                    self._ready.set()
                    await self._stop.wait()
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> LiveServer:
        self._thread.start()
        self._ready.wait(120)
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        self.loop.close()

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run ``coro`` on the server's loop (its engine and core live there) and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(120)

    def stats(self) -> dict[str, Any]:
        return self.engine.stats()


@pytest.fixture(scope="session")
def serve_config(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path, tiny_adapters: Path) -> Config:
    folder = tmp_path_factory.mktemp("serve")
    return load_config(write_config(folder / "config.toml", tiny_base, tiny_adapters, folder / "log.db"))


@pytest.fixture(scope="session")
def server(serve_config: Config) -> Iterator[LiveServer]:
    """One server without a key for the whole session (tests read metric deltas, not absolute values)."""
    live = LiveServer(serve_config).start()
    yield live
    live.stop()


def metric(text: str, name: str, **labels: str) -> float:
    """One sample's value from Prometheus text (0 when absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


async def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics", headers=headers) as response:
        assert response.status == 200
        return await response.text()


def eos_id(engine: Any) -> int:
    return engine._tok.eos_token_id  # the tests ban it to make a generation run long


# ---------------------------------------------------------------- the real command, as a process
class ServeProcess:
    """``lorabot serve --port 0`` run as a user runs it; the port is read from its start line."""

    def __init__(self, config_path: Path, *args: str, port: int = 0, env: dict[str, str] | None = None):
        environment = {k: v for k, v in os.environ.items() if not k.endswith("_BOT_TOKEN")} | (env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bot", "--config", str(config_path), "serve", "--port", str(port), *args],
            cwd=REPO, env=environment, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
        )
        self.url = ""
        self.log: list[str] = []
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.log.append(line)
            found = re.search(r"lorabot serve: (http://\S+?)/ ", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.proc.kill()
            raise RuntimeError("lorabot serve did not start:\n" + "".join(self.log))
        # Keep draining stderr so the server never blocks on a full pipe.
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def copy_adapters(src: Path, dst: Path, names: tuple[str, ...] | None = None) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for folder in sorted(src.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (names is None or folder.name in names):
            shutil.copytree(folder, dst / folder.name)
    return dst


def set_manifest(folder: Path, **changes: Any) -> None:
    path = folder / "lorabot.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes), encoding="utf-8")

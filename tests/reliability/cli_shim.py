"""``python -m bot`` with FakeEngine in place of the model, and optional SQLite fault injection.

Runs the real ``bot.cli.main`` (argument parsing, logging set-up, open_app, console/transports, error
reporting); only ``bot.app.load_engine`` is replaced, so a CLI-level test costs ~1 s instead of ~20 s of
importing transformers. Environment switches (test-only):

    LORABOT_SHIM_MAX_PAGES=1   every database connection gets PRAGMA max_page_count = its current size,
                               i.e. the disk is full from the first write that needs a new page.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bot.app
from bot import store as store_module
from bot.cli import main
from tests.fakes import FakeEngine

bot.app.load_engine = lambda config, progress=True: FakeEngine()

if os.environ.get("LORABOT_SHIM_MAX_PAGES"):
    _setup = store_module.Store._setup.__func__  # type: ignore[attr-defined]

    def _full_disk_setup(cls, conn, path, **kwargs):  # type: ignore[no-untyped-def]
        store = _setup(cls, conn, path, **kwargs)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")
        return store

    store_module.Store._setup = classmethod(_full_disk_setup)  # type: ignore[method-assign]

if __name__ == "__main__":
    sys.exit(main())

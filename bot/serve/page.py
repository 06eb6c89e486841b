"""The page at ``/``: plain HTML with its style and script inline, served by the same process.

Its Content-Security-Policy allows exactly that inline script and style (by hash) and connections to
this server only, so the browser itself guarantees the page loads nothing from anywhere else.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from aiohttp import web


@cache
def page() -> tuple[str, str]:
    """(the HTML, its Content-Security-Policy)."""
    html = resources.files("bot.serve").joinpath("page.html").read_text(encoding="utf-8")

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks)

    policy = (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
              "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html, policy


async def index(request: web.Request) -> web.Response:
    html, policy = page()
    return web.Response(text=html, content_type="text/html", headers={
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    })

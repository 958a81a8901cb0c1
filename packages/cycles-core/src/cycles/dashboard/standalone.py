"""``cycles dashboard``: the dashboard on localhost over a ledger, signed in through a one-time link.

The server it starts listens on 127.0.0.1 only, with a fresh random admin key that never leaves
this process: the browser is opened on a sign-in link whose token works once.
"""

from __future__ import annotations

import secrets
import sys
import threading
import webbrowser
from typing import Any

from cycles.ledger.base import default_ledger_url

__all__ = ["run_dashboard"]


def run_dashboard(
    ledger_url: str | None, *, port: int = 7879, open_browser: bool = True, admin_key: str | None = None
) -> int:
    import uvicorn

    from cycles.server.app import create_app
    from cycles.server.cli import listen_socket

    url = ledger_url or default_ledger_url()
    options: dict[str, Any] = {}
    if url.split("://", 1)[0].lower() in ("http", "https"):
        import os

        key = admin_key or os.environ.get("CYCLES_ADMIN_KEY")
        if not key:
            print("error: an http(s) ledger needs --admin-key (or $CYCLES_ADMIN_KEY)", file=sys.stderr)
            return 2
        from cycles.ledger.http import AsyncHttpLedger

        options["ledger"] = AsyncHttpLedger(url, admin_key=key)
        options["keys_url"] = "memory://"  # the remote server keeps its keys; this one needs none
    app = create_app(url, admin_key=secrets.token_urlsafe(32), access_log=False, **options)
    sock = listen_socket("127.0.0.1", port)
    bound = sock.getsockname()[1]
    link = f"http://127.0.0.1:{bound}/dashboard/login?token={app.server.dashboard.login_token()}"  # type: ignore[attr-defined]
    print(f"cycles dashboard: {url} at http://127.0.0.1:{bound}/dashboard (Ctrl-C to stop)", file=sys.stderr)
    print(f"sign in once with: {link}", file=sys.stderr)
    if open_browser:
        threading.Timer(0.5, webbrowser.open, args=(link,)).start()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.run(sockets=[sock])
    return 0

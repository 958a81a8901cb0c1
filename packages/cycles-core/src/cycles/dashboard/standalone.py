"""``cycles dashboard``: the dashboard on localhost over a ledger, signed in through a one-time link.

The server it starts listens on 127.0.0.1 only, with a fresh random admin key that never leaves
this process: the browser is opened on a sign-in link whose token works once. A ``http(s)://``
ledger is a Cycles server, which serves its own dashboard: that one is opened instead.
"""

from __future__ import annotations

import secrets
import sys
import threading
import webbrowser

from cycles.ledger.base import default_ledger_url

__all__ = ["run_dashboard"]


def run_dashboard(ledger_url: str | None, *, port: int = 7879, open_browser: bool = True) -> int:
    import uvicorn

    from cycles.server.app import create_app
    from cycles.server.cli import listen_socket

    url = ledger_url or default_ledger_url()
    if url.split("://", 1)[0].lower() in ("http", "https"):
        # A Cycles server serves its own dashboard, next to its ledger and its event store.
        remote = url.rstrip("/").removesuffix("/v1") + "/dashboard"
        print(f"cycles dashboard: {url} is a Cycles server; its dashboard is at {remote}", file=sys.stderr)
        if open_browser:
            webbrowser.open(remote)
        return 0
    app = create_app(url, admin_key=secrets.token_urlsafe(32), access_log=False)
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

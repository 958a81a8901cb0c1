"""A real uvicorn server in a background thread, for tests that need a URL (clients, SDKs).

    with ServerThread(create_app("memory://", admin_key="k")) as srv:
        httpx.get(srv.url + "/healthz")

The socket is bound before the thread starts (port 0: a free one), and ``__enter__`` returns only
once ``/healthz`` answers, so no test waits on a fixed sleep.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from types import TracebackType
from typing import Any

__all__ = ["ServerThread"]


class ServerThread:
    def __init__(
        self,
        app: Any,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        ready_timeout_s: float = 10.0,
        **uvicorn_options: Any,
    ) -> None:
        import uvicorn

        from cycles.server.cli import listen_socket

        self._sock = listen_socket(host, port)  # TCP_NODELAY: see listen_socket
        self.host, self.port = host, int(self._sock.getsockname()[1])
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", **uvicorn_options)
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name=f"cycles-server-{self.port}", daemon=True)
        self._ready_timeout_s = ready_timeout_s
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()
            self._error = exc

    def start(self) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + self._ready_timeout_s
        while True:
            if self._error is not None or not self._thread.is_alive():
                raise RuntimeError(f"server thread died: {self._error!r}")
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server at {self.url} not ready after {self._ready_timeout_s} s")
            time.sleep(0.01)  # readiness probe interval, bounded by the deadline

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

"""The Cycles server: protocol v0 over HTTP, over any ledger (``cycles serve``).

    from cycles.server import create_app
    app = create_app("sqlite:///ledger.db", admin_key="...")   # an ASGI app; run it with uvicorn

Needs the ``server`` extra: ``pip install 'cycles-core[server]'``.
"""

try:
    import starlette  # noqa: F401  # the server extra
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError(f"cycles.server needs the server extra: pip install 'cycles-core[server]' ({exc})") from exc

from cycles.server.app import CyclesServer, create_app
from cycles.server.keys import KeyInfo, KeyStore, NewKey, open_key_store

__all__ = ["CyclesServer", "KeyInfo", "KeyStore", "NewKey", "create_app", "open_key_store"]

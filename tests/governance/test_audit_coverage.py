"""Every mutating operator operation the server serves leaves an audit entry, on memory, SQLite and
Redis: the list of operations is read from the running app (each handler wrapped by ``audited``
names its operation), so an endpoint added later is held to it without editing this test. Each is
called with the admin key and an empty body: a refusal or a 4xx is audited like a success."""

from __future__ import annotations

import re

from cycles.server.testing import ServerThread

from .conftest import Api


def test_every_audited_operation_leaves_an_entry(api: Api, live: ServerThread) -> None:
    app = live.server.config.app
    endpoints = [getattr(route, "endpoint", None) for route in app.starlette.routes]
    named = [e for e in endpoints if getattr(getattr(e, "handler", None), "operation", None)]
    audited = sorted({(e.method, e.path, e.handler.operation) for e in named})
    assert len(audited) >= 25, audited
    calls = {}
    for method, path, operation in audited:
        response = api.a(method, re.sub(r"\{[^}]+\}", "nope", path), json={})
        calls[response.headers["x-request-id"]] = (operation, response.status_code)
    for request_id, (operation, status) in calls.items():
        logs = api.a("GET", f"/v1/admin/audit/logs?request_id={request_id}").json()["logs"]
        assert [(x["operation"], x["status"]) for x in logs] == [(operation, status)], (operation, status)

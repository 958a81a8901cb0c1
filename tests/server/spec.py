"""Response validation against the protocol spec: every response our server gives in these tests
is checked against ``cycles-protocol-v0.yaml`` (with the additive v0.1.26 runtime extensions folded
in) for its operation and status.

For an operation of the spec: the status must be one the operation declares, the JSON body must
validate against that response's schema (JSON Schema 2020-12, which OpenAPI 3.1 schemas are), and
the correlation headers must be present and well-formed. Error bodies of our own planes (admin,
unknown routes) must be the spec's ErrorResponse. ``check`` raises AssertionError on a violation.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_URI = "urn:cycles:protocol-v0"
_TRACE = re.compile(r"^[0-9a-f]{32}$")


def find_spec() -> Path | None:
    """``$CYCLES_PROTOCOL_SPEC``, else ``shared/spec/`` beside the repository (as in CI)."""
    env = os.environ.get("CYCLES_PROTOCOL_SPEC")
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[2]
    for candidate in (root / "spec", root.parent / "shared" / "spec"):
        path = candidate / "cycles-protocol-v0.yaml"
        if path.exists():
            return path
    return None


def with_extensions(base: dict[str, Any], ext: dict[str, Any]) -> None:
    """Fold the v0.1.26 runtime extensions into the base spec, as their EXTENSION CONTRACT says:
    the new schemas, the additive fields (deny_detail, observe_mode, policy_keys) and error codes."""
    schemas = base["components"]["schemas"]
    new = ext["components"]["schemas"]
    for name in ("DenyDetail", "ActionQuotaViolation", "ObserveModeEnum"):
        schemas[name] = new[name]
    for target, source in (
        ("DecisionResponse", "DecisionResponseExtension"),
        ("ReservationCreateResponse", "ReservationCreateResponseExtension"),
        ("ReservationCreateRequest", "ReservationCreateRequestExtension"),
        ("Action", "ActionExtension"),
    ):
        schemas[target]["properties"].update(new[source]["properties"])
    details = schemas["ErrorResponse"]["properties"]["details"]
    details.setdefault("properties", {}).update(new["ErrorResponseExtension"]["properties"]["details"]["properties"])
    codes = schemas["ErrorCode"]["enum"]
    codes += [c for c in new["ErrorCodeExtension"]["enum"] if c not in codes]


def with_governance_extensions(base: dict[str, Any], ext: dict[str, Any]) -> None:
    """Fold the governance extensions' policy fields into the admin spec's Policy, as their PATH
    COVERAGE says (responses carry the four v0.1.26 fields; strict validators must allow them)."""
    schemas = base["components"]["schemas"]
    new = ext["components"]["schemas"]
    schemas["Policy"]["properties"].update(new["PolicyExtension"]["properties"])
    schemas["PolicyCreateRequest"]["properties"].update(new["PolicyCreateRequestExtension"]["properties"])
    # PATH COVERAGE names GET /v1/admin/policies/{policy_id}, which the base spec does not declare:
    # declared here as the extension describes it (the extended Policy; the update's error shapes).
    item = base["paths"]["/v1/admin/policies/{policy_id}"]
    if "get" not in item:
        patch = item["patch"]
        item["get"] = {
            "operationId": "getPolicy",
            "security": patch["security"],
            "parameters": patch["parameters"],
            "responses": {c: r for c, r in patch["responses"].items() if c in ("200", "401", "403", "404", "500")},
        }


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@dataclass
class Operation:
    method: str
    template: str
    pattern: re.Pattern[str]
    pointer: str
    op: dict[str, Any]


@dataclass
class SpecValidator:
    path: Path
    checked: int = 0
    by_status: dict[tuple[str, int], int] = field(default_factory=dict)

    @cached_property
    def doc(self) -> dict[str, Any]:
        with self.path.open() as f:
            loaded: dict[str, Any] = yaml.safe_load(f)
        extensions = self.path.parent / "cycles-protocol-extensions-v0.1.26.yaml"
        if self.path.name == "cycles-protocol-v0.yaml" and extensions.exists():  # runtime extensions only
            with extensions.open() as f:
                with_extensions(loaded, yaml.safe_load(f))
        governance = self.path.parent / "cycles-governance-extensions-v0.1.26.yaml"
        if self.path.name.startswith("cycles-governance-admin") and governance.exists():
            with governance.open() as f:
                governance_ext = yaml.safe_load(f)
            with_governance_extensions(loaded, governance_ext)
            # the Permission enum gains action_quotas:read (v0.1.26)
            extended = governance_ext["components"]["schemas"]["PermissionExtension"]["enum"]
            permissions = loaded["components"]["schemas"]["Permission"]["enum"]
            permissions += [p for p in extended if p not in permissions]
        if self.path.name.startswith("cycles-governance-admin") and extensions.exists():
            with extensions.open() as f:  # and the EventType enum the four v0.1.26 event types
                types = yaml.safe_load(f)["components"]["schemas"]["EventTypeExtension"]["enum"]
            known = loaded["components"]["schemas"]["EventType"]["enum"]
            known += [t for t in types if t not in known]
        return loaded

    @cached_property
    def registry(self) -> Registry[Any]:
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        return Registry().with_resource(_URI, resource)

    @cached_property
    def operations(self) -> list[Operation]:
        ops = []
        for template, item in self.doc["paths"].items():
            regex = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
            for method, op in item.items():
                if method in ("get", "post", "put", "delete", "patch"):
                    pointer = f"/paths/{_escape(template)}/{method}"
                    ops.append(Operation(method.upper(), template, re.compile(regex), pointer, op))
        # literal paths before templated ones (/v1/.well-known/... vs /v1/evidence/{id})
        ops.sort(key=lambda o: o.template.count("{"))
        return ops

    def operation(self, method: str, path: str) -> Operation | None:
        for op in self.operations:
            if op.method == method and op.pattern.match(path):
                return op
        return None

    def _validator(self, pointer: str) -> Draft202012Validator:
        cache: dict[str, Draft202012Validator] = self.__dict__.setdefault("_validators", {})
        if pointer not in cache:
            cache[pointer] = Draft202012Validator({"$ref": f"{_URI}#{pointer}"}, registry=self.registry)
        return cache[pointer]

    def _resolve(self, obj: dict[str, Any], pointer: str) -> tuple[dict[str, Any], str]:
        while "$ref" in obj:
            ref = obj["$ref"]
            assert ref.startswith("#/"), ref
            pointer = ref[1:]
            node: Any = self.doc
            for part in ref[2:].split("/"):
                node = node[part.replace("~1", "/").replace("~0", "~")]
            obj = node
        return obj, pointer

    def _schema_errors(self, pointer: str, body: Any) -> list[str]:
        errors = sorted(self._validator(pointer).iter_errors(body), key=lambda e: list(e.path))
        return [f"{'/'.join(map(str, e.path)) or '<body>'}: {e.message[:300]}" for e in errors[:5]]

    def check(self, method: str, path: str, status: int, headers: Any, content: bytes) -> None:
        """Raise AssertionError if the response breaks the spec."""
        where = f"{method} {path} -> {status}"
        op = self.operation(method, path)
        protocol_plane = op is not None or path.startswith(("/v1/", "/admin/"))
        if protocol_plane:
            request_id = headers.get("x-request-id")
            trace_id = headers.get("x-cycles-trace-id")
            assert request_id, f"{where}: no X-Request-Id header"
            assert trace_id and _TRACE.match(trace_id), f"{where}: bad X-Cycles-Trace-Id {trace_id!r}"
            assert trace_id != "0" * 32, f"{where}: all-zero trace id"
        body: Any = None
        if content and "json" in headers.get("content-type", ""):
            body = json.loads(content)
        if op is not None and method != "HEAD":
            responses = op.op["responses"]
            key = str(status) if str(status) in responses else ("default" if "default" in responses else None)
            if key is None and status == 503:
                # Our one documented extension (docs/server.md): an unreachable ledger is 503 with
                # Retry-After and the same ErrorResponse body as the 500 every operation declares.
                key = "500"
            assert key is not None, f"{where}: status {status} is not declared by {op.op['operationId']}"
            resp, pointer = self._resolve(responses[key], f"{op.pointer}/responses/{key}")
            media = resp.get("content", {}).get("application/json")
            if media is not None:
                assert body is not None, f"{where}: expected a JSON body"
                errors = self._schema_errors(f"{pointer}/content/application~1json/schema", body)
                assert not errors, f"{where}: response violates the spec: {errors}; body={str(body)[:500]}"
            self.by_status[(op.op["operationId"], status)] = self.by_status.get((op.op["operationId"], status), 0) + 1
        elif protocol_plane and status >= 400 and method != "HEAD":
            errors = self._schema_errors("/components/schemas/ErrorResponse", body)
            assert not errors, f"{where}: error body is not an ErrorResponse: {errors}; body={str(body)[:500]}"
        if protocol_plane and status >= 400 and method != "HEAD" and isinstance(body, dict):
            assert body.get("request_id") == headers.get("x-request-id"), f"{where}: request_id differs from header"
            assert body.get("trace_id") == headers.get("x-cycles-trace-id"), f"{where}: trace_id differs from header"
        self.checked += 1

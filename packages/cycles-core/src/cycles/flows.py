"""Operations written once, sent synchronously or with ``await``.

An operation is a generator (a *flow*) that yields what it needs done (a ``Call``: an HTTP call
with method, path, params and body; or a ``LedgerCall``: a ledger method and its arguments) and is
sent each answer; its return value is the result. It does no I/O, so one definition serves both
shells: a ``SyncSender`` drives it with blocking calls, an ``AsyncSender`` awaits each one (the idea
of httpx's auth flows). HTTP errors are mapped to the typed errors once, in ``answer``.

``@operation`` turns a flow into a method of a ``Group``: on a ``Group[SyncSender]`` it returns the
result, on a ``Group[AsyncSender]`` an awaitable of it, and mypy knows which::

    class _Things(Group[S]):
        @operation
        def get(self, thing_id: str) -> Flow[Json]:
            found: Json = yield Call("GET", f"/v1/things/{thing_id}")
            return found

    _Things(HttpSender(client)).get("t1")                   # -> Json
    await _Things(AsyncHttpSender(open_client)).get("t1")   # -> Json

A flow with ``**kwargs`` marks ``self`` positional-only (``def list(self, /, **filters)``): mypy
cannot otherwise tell ``self`` from a keyword argument.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Concatenate, Generic, NamedTuple, ParamSpec, TypeVar, overload

from cycles.errors import CyclesError, error_for

if TYPE_CHECKING:  # httpx is an extra (server, http): the ledger senders need none
    import httpx

__all__ = [
    "AsyncHttpSender",
    "AsyncLedgerSender",
    "AsyncSender",
    "Call",
    "Flow",
    "Group",
    "HttpSender",
    "Json",
    "LedgerCall",
    "LedgerSender",
    "S",
    "Sender",
    "SyncSender",
    "operation",
    "pages",
]

Json = dict[str, Any]
T = TypeVar("T")
P = ParamSpec("P")


class Call(NamedTuple):
    """One HTTP call of an operation (params that are None are left out)."""

    method: str
    path: str
    params: Json | None = None
    json: Any = None

    def request(self) -> Json:
        clean = {k: v for k, v in (self.params or {}).items() if v is not None}
        return {"method": self.method, "url": self.path, "params": clean, "json": self.json}


class LedgerCall:
    """One ledger method call of an operation: ``ledger.<method>(*args, **kwargs)``."""

    __slots__ = ("args", "kwargs", "method")

    def __init__(self, method: str, *args: Any, **kwargs: Any) -> None:
        self.method, self.args, self.kwargs = method, args, kwargs


#: An operation: yields its calls (``Call`` or ``LedgerCall``), is sent each answer, returns its result.
Flow = Generator[Any, Any, T]


def answer(response: httpx.Response) -> Any:
    """The JSON of a 2xx answer (None when empty); any other status raises its typed error."""
    if response.status_code >= 400:
        try:
            body = response.json()
        except ValueError:
            body = {}
        err: CyclesError = error_for(
            str(body.get("error") or "INTERNAL_ERROR"),
            str(body.get("message") or f"HTTP {response.status_code}"),
            details=body.get("details"),
            request_id=body.get("request_id"),
            trace_id=body.get("trace_id"),
        )
        raise err
    return response.json() if response.content else None


def pages(path: str, field: str, params: Json, limit: int | None) -> Flow[list[Json]]:
    """Every item of a cursor-paged list (up to ``limit``)."""
    out: list[Json] = []
    cursor = None
    while True:
        page = yield Call("GET", path, params={**params, "cursor": cursor, "limit": 100})
        out.extend(page[field])
        cursor = page.get("next_cursor")
        if not page.get("has_more") or not cursor or (limit is not None and len(out) >= limit):
            return out[:limit] if limit is not None else out


class _Steps(Generic[T]):
    """A flow being driven: ``call`` is the next call to send (None once it returned ``result``)."""

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self.call: Call | None = None
        self.result: T
        self.give(None)

    def give(self, value: Any) -> None:
        try:
            self.call = self._flow.send(value)
        except StopIteration as done:
            self.call, self.result = None, done.value


class Sender:
    """Sends the calls of flows: ``SyncSender`` or ``AsyncSender``."""


class SyncSender(Sender):
    def send(self, call: Any) -> Any:
        raise NotImplementedError

    def drive(self, flow: Flow[T]) -> T:
        steps = _Steps(flow)
        while steps.call is not None:
            steps.give(self.send(steps.call))
        return steps.result


class AsyncSender(Sender):
    async def send(self, call: Any) -> Any:
        raise NotImplementedError

    async def drive(self, flow: Flow[T]) -> T:
        steps = _Steps(flow)
        while steps.call is not None:
            steps.give(await self.send(steps.call))
        return steps.result


class HttpSender(SyncSender):
    """``Call``s over an ``httpx.Client`` (or Starlette's ``TestClient``, one of them)."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client

    def send(self, call: Call) -> Any:
        return answer(self.client.request(**call.request()))


class AsyncHttpSender(AsyncSender):
    """``Call``s over an ``httpx.AsyncClient`` made by ``open_client`` on first use, in a worker
    thread (setting up an in-process app opens its stores: blocking work kept off the event loop)."""

    def __init__(self, open_client: Callable[[], httpx.AsyncClient]) -> None:
        self._open_client = open_client
        self.client: httpx.AsyncClient | None = None
        self._opening = asyncio.Lock()

    async def send(self, call: Call) -> Any:
        if self.client is None:
            async with self._opening:
                if self.client is None:
                    self.client = await asyncio.to_thread(self._open_client)
        return answer(await self.client.request(**call.request()))


class LedgerSender(SyncSender):
    """``LedgerCall``s on a ``Ledger``."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    def send(self, call: LedgerCall) -> Any:
        return getattr(self.ledger, call.method)(*call.args, **call.kwargs)


class AsyncLedgerSender(AsyncSender):
    """``LedgerCall``s on an ``AsyncLedger``, awaited."""

    def __init__(self, ledger: Any) -> None:
        self.ledger = ledger

    async def send(self, call: LedgerCall) -> Any:
        return await getattr(self.ledger, call.method)(*call.args, **call.kwargs)


S = TypeVar("S", bound=Sender)


class Group(Generic[S]):
    """A set of operations sharing one sender."""

    def __init__(self, send: S) -> None:
        self._send = send


class operation(Generic[P, T]):
    """A flow as a method of a ``Group``: its result (sync sender) or an awaitable of it (async)."""

    def __init__(self, flow: Callable[Concatenate[Any, P], Flow[T]]) -> None:
        #: the undecorated flow, for composing operations (``yield from Group.op.flow(self, ...)``)
        self.flow = flow
        self.__doc__ = flow.__doc__
        self.name = flow.__name__

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name  # ``list = _listing(...)``: the attribute's name, not the flow's

    @overload
    def __get__(self, group: None, owner: type) -> operation[P, T]: ...
    @overload
    def __get__(self, group: Group[SyncSender], owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, group: Group[AsyncSender], owner: type) -> Callable[P, Awaitable[T]]: ...
    def __get__(self, group: Group[Any] | None, owner: type) -> Any:
        if group is None:
            return self
        flow, drive = self.flow, group._send.drive

        @functools.wraps(flow)
        def bound(*args: Any, **kwargs: Any) -> Any:
            return drive(flow(group, *args, **kwargs))

        group.__dict__[self.name] = bound  # made once per group: later lookups find it first
        return bound

"""What an LLM call costs, from model name and token counts, offline.

Prices come from the data bundled inside the ``genai-prices`` wheel and are never fetched: a budget
authority must price a call the same way with or without a network, and must not stall an agent's
hot path on HTTP. Models the data does not know get a price from ``register_price`` (which also
overrides bundled prices) or from ``set_fallback``; without either, pricing raises ``UnpricedModel``.

Token counts follow genai-prices (and OpenAI's ``prompt_tokens``): ``input_tokens`` counts every
prompt token, the cached ones included; ``cached_input_tokens`` says how many of them were cache
reads. For Anthropic that means ``input_tokens = input_tokens + cache_creation_input_tokens +
cache_read_input_tokens`` and ``cached_input_tokens = cache_read_input_tokens``.

Money is Decimal throughout and ends as whole ``USD_MICROCENTS`` (1 USD = 10^8) rounded up, so a
charge is never below what the provider bills.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from typing import TYPE_CHECKING, Final, overload

from cycles.errors import UnpricedModel
from cycles.models import Amount, Unit

if TYPE_CHECKING:
    from genai_prices.data_snapshot import DataSnapshot
    from genai_prices.types import ModelInfo, ModelPrice, TieredPrices

__all__ = [
    "Pricer",
    "approx_messages_tokens",
    "approx_tokens",
    "default_pricer",
    "estimate_cost",
    "price_answer",
    "price_usage",
    "register_price",
    "set_fallback",
]

log = logging.getLogger("cycles.pricing")

Rate = float | Decimal
"""USD per million tokens. Floats go through ``str`` so 0.15 stays 0.15."""

# (threshold, USD per Mtok) pairs, highest threshold first; the base rate has threshold -1.
_Tiers = tuple[tuple[int, Decimal], ...]

# USD/Mtok times tokens is millionths of a USD; one millionth of a USD is 100 microcents.
_MICROCENTS_PER_USD_PER_MTOK: Final = 100
# genai-prices prices requests per thousand; one request at 1 USD/K is 10^5 microcents.
_MICROCENTS_PER_USD_PER_KREQ: Final = 100_000
# Adapters price every call with a handful of model names; the bound only stops a runaway of
# distinct names (e.g. generated fine-tune ids) from growing memory without limit.
_CACHE_LIMIT: Final = 4096


@dataclass(frozen=True, slots=True)
class _Price:
    input: _Tiers | None
    output: _Tiers | None
    cached_input: _Tiers | None  # None: cache reads cost the full input rate (never under-charge)
    request: _Tiers | None = None

    def microcents(self, input_tokens: int, cached_input_tokens: int, output_tokens: int) -> int:
        cached_rate = self.input if self.cached_input is None else self.cached_input
        total = Decimal(0)
        for tiers, count in (
            (self.input, input_tokens - cached_input_tokens),
            (cached_rate, cached_input_tokens),
            (self.output, output_tokens),
        ):
            if tiers is not None and count:
                total += _rate(tiers, input_tokens) * count * _MICROCENTS_PER_USD_PER_MTOK
        if self.request is not None:
            total += _rate(self.request, input_tokens) * _MICROCENTS_PER_USD_PER_KREQ
        return int(total.to_integral_value(rounding=ROUND_CEILING))


def _rate(tiers: _Tiers, input_tokens: int) -> Decimal:
    # genai-prices' "cliff" tiers: once the prompt exceeds a threshold, that tier's rate applies to
    # every token of the call (output too), as Anthropic and Google bill long-context requests.
    for start, price in tiers:
        if input_tokens > start:
            return price
    return tiers[-1][1]


def _tiers(value: Decimal | TieredPrices | None) -> _Tiers | None:
    if value is None:
        return None
    if isinstance(value, Decimal):
        return ((-1, value),)
    return (*sorted(((t.start, t.price) for t in value.tiers), reverse=True), (-1, value.base))


def _from_bundled(prices: ModelPrice) -> _Price:
    # Only the units a token count can reach; cache writes, searches, audio etc. get no count from
    # price_usage, so genai-prices would price them at zero too.
    return _Price(
        input=_tiers(prices.input_mtok),
        output=_tiers(prices.output_mtok),
        cached_input=_tiers(prices.cache_read_mtok),
        request=_tiers(prices.requests_kcount),
    )


def _decimal(value: Rate, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise TypeError(f"{what} must be a number of USD per million tokens, got {value!r}")
    number = Decimal(str(value)) if isinstance(value, float) else Decimal(value)
    if not number.is_finite() or number < 0:
        raise ValueError(f"{what} must be a finite, non-negative USD per million tokens, got {value!r}")
    return number


def _user_price(input_per_mtok: Rate, output_per_mtok: Rate, cached_input_per_mtok: Rate | None) -> _Price:
    cached = None if cached_input_per_mtok is None else _decimal(cached_input_per_mtok, "cached_input_per_mtok")
    return _Price(
        input=_tiers(_decimal(input_per_mtok, "input_per_mtok")),
        output=_tiers(_decimal(output_per_mtok, "output_per_mtok")),
        cached_input=_tiers(cached),
    )


def _split(model: str, provider: str | None) -> tuple[str | None, str, str]:
    """``(provider, model, whole name)`` from "openai:gpt-4o", "openai/gpt-4o" or "gpt-4o", lowercased."""
    name = model.strip().lower()
    if provider is not None:
        provider = provider.strip().lower()
        for sep in ":/":
            if name.startswith(provider + sep):
                return provider, name[len(provider) + 1 :], name
        return provider, name, name
    # The earlier separator wins: "openai/gpt-4o:free" is OpenRouter's free gpt-4o, and
    # "bedrock:us.anthropic.claude-...-v1:0" is a Bedrock id. A head that is no provider at all
    # ("meta-llama/...") is harmless: lookups also try the whole name and the bare model.
    cut = min((i for i in (name.find(":"), name.find("/")) if i > 0), default=-1)
    if 0 < cut < len(name) - 1:
        return name[:cut], name[cut + 1 :], name
    return None, name, name


@functools.cache
def _snapshot() -> DataSnapshot:
    # Our own snapshot over the bundled provider list, imported on first use (about 0.5 s):
    # genai_prices.calc_price() follows set_custom_snapshot(), which UpdatePrices uses to swap in
    # prices fetched over HTTP; this one only ever sees the data shipped in the wheel.
    from genai_prices.data import providers
    from genai_prices.data_snapshot import DataSnapshot

    return DataSnapshot(providers=providers, from_auto_update=False)


def _now() -> datetime:
    return datetime.now(UTC)


class Pricer:
    """Prices LLM calls. Instances are independent: overrides and fallback belong to one pricer.

    Lookups are cached per ``(model, provider)`` as given, so the hot path is a dict hit and a few
    Decimal multiplications. Registration is serialized by a lock and clears the cache.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._overrides: dict[tuple[str | None, str], _Price] = {}
        self._fallback: _Price | None = None
        # None caches "unpriced" so an unknown model with a fallback stays cheap; a ModelInfo is a
        # bundled model whose price depends on the date or time of day (e.g. DeepSeek off-peak).
        self._cache: dict[tuple[str, str | None], _Price | ModelInfo | None] = {}

    def price_usage(
        self,
        model: str,
        *,
        input_tokens: int,
        output_tokens: int,
        cached_input_tokens: int = 0,
        provider: str | None = None,
    ) -> Amount:
        """Actual cost of a call, in USD_MICROCENTS rounded up. ``input_tokens`` includes cached ones."""
        if input_tokens < 0 or output_tokens < 0 or cached_input_tokens < 0:
            raise ValueError("token counts must not be negative")
        if cached_input_tokens > input_tokens:
            raise ValueError(
                f"cached_input_tokens ({cached_input_tokens}) exceeds input_tokens ({input_tokens}): "
                "input_tokens must count every prompt token, the cached ones included"
            )
        key = (model, provider)
        try:
            entry = self._cache[key]
        except KeyError:
            entry = self._fill(key)
        if entry is None:
            price = self._fallback
            if price is None:
                raise _unpriced(model, provider)
        elif isinstance(entry, _Price):
            price = entry
        else:
            price = _from_bundled(entry.get_prices(_now()))
        amount = price.microcents(input_tokens, cached_input_tokens, output_tokens)
        return Amount(unit=Unit.USD_MICROCENTS, amount=amount)

    def estimate_cost(
        self, model: str, *, input_tokens: int, max_output_tokens: int, provider: str | None = None
    ) -> Amount:
        """Worst case for a reservation: no cache hits and every one of ``max_output_tokens`` produced."""
        return self.price_usage(model, input_tokens=input_tokens, output_tokens=max_output_tokens, provider=provider)

    def register_price(
        self,
        model: str,
        *,
        input_per_mtok: Rate,
        output_per_mtok: Rate,
        cached_input_per_mtok: Rate | None = None,
        provider: str | None = None,
    ) -> None:
        """Price ``model`` (USD per million tokens), overriding bundled data.

        Without a provider (as argument or "provider:" prefix) the price applies whatever provider a
        call names. Names match case-insensitively and exactly: register each dated variant you use.
        Without ``cached_input_per_mtok`` cache reads cost the full input rate.
        """
        price = _user_price(input_per_mtok, output_per_mtok, cached_input_per_mtok)
        head, name, _ = _split(model, provider)
        with self._lock:
            self._overrides[head, name] = price
            self._cache.clear()

    @overload
    def set_fallback(self, input_per_mtok: None, /) -> None: ...
    @overload
    def set_fallback(
        self, input_per_mtok: Rate, output_per_mtok: Rate, *, cached_input_per_mtok: Rate | None = None
    ) -> None: ...
    def set_fallback(
        self,
        input_per_mtok: Rate | None,
        output_per_mtok: Rate | None = None,
        *,
        cached_input_per_mtok: Rate | None = None,
    ) -> None:
        """Price for models nothing else prices; ``set_fallback(None)`` makes them raise again."""
        if input_per_mtok is None:
            fallback = None
        elif output_per_mtok is None:
            raise TypeError("set_fallback() needs output_per_mtok with input_per_mtok")
        else:
            fallback = _user_price(input_per_mtok, output_per_mtok, cached_input_per_mtok)
        # Read on every unpriced call rather than cached, so no cache to clear.
        self._fallback = fallback

    def _fill(self, key: tuple[str, str | None]) -> _Price | ModelInfo | None:
        # Resolving under the lock keeps a concurrent register_price from being overwritten by a
        # lookup that started before it; only the first call per name pays for it.
        with self._lock:
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            entry = self._cache[key] = self._resolve(*key)
            return entry

    def _resolve(self, model: str, provider: str | None) -> _Price | ModelInfo | None:
        head, name, whole = _split(model, provider)
        for override_key in ((head, name), (None, name), (None, whole)):
            if (override := self._overrides.get(override_key)) is not None:
                return override
        # Most specific first: the named provider's own entry (or the providers it resells, e.g.
        # Azure -> OpenAI), then genai-prices' guess of the provider from the model name. The name as
        # written comes before the bare model: some providers list both ("perplexity/sonar" and
        # "sonar" are different products at different prices).
        snapshot = _snapshot()
        candidates = ((head, whole), (head, name), (None, whole), (None, name)) if head else ((None, name),)
        for provider_id, ref in dict.fromkeys(candidates):
            try:
                _, info = snapshot.find_provider_model(ref, None, provider_id, None)
            except LookupError:
                continue
            return info if isinstance(info.prices, list) else _from_bundled(info.prices)
        return None


def _unpriced(model: str, provider: str | None) -> UnpricedModel:
    where = f" (provider {provider!r})" if provider else ""
    return UnpricedModel(
        f"no price known for model {model!r}{where} in the bundled genai-prices data; call "
        f"cycles.pricing.register_price({model!r}, input_per_mtok=..., output_per_mtok=...) with its "
        "USD per million tokens, or cycles.pricing.set_fallback(input_per_mtok=..., output_per_mtok=...) "
        "to price every unknown model",
        details={"model": model, "provider": provider},
    )


default_pricer: Final = Pricer()
"""The pricer behind the module functions; a Cycles client may carry its own ``Pricer()``."""


def price_usage(
    model: str,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    provider: str | None = None,
) -> Amount:
    """Actual cost of a call, in USD_MICROCENTS rounded up. ``input_tokens`` includes cached ones."""
    return default_pricer.price_usage(
        model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_input_tokens=cached_input_tokens,
        provider=provider,
    )


def price_answer(
    answered: str,
    *,
    requested: str,
    input_tokens: int,
    output_tokens: int,
    cached_input_tokens: int = 0,
    provider: str | None = None,
) -> Amount:
    """A response priced by the model that ``answered`` it (a fallback, a router), not the one
    ``requested``; a model the data does not know is priced as the requested one, with a warning."""

    def price(model: str) -> Amount:
        return price_usage(
            model,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            cached_input_tokens=cached_input_tokens,
            provider=provider,
        )

    try:
        return price(answered)
    except UnpricedModel:
        if answered == requested:
            raise
        log.warning("%s answered a call to %s but has no price: priced as %s", answered, requested, requested)
        return price(requested)


def estimate_cost(model: str, *, input_tokens: int, max_output_tokens: int, provider: str | None = None) -> Amount:
    """Worst case for a reservation: no cache hits and every one of ``max_output_tokens`` produced."""
    return default_pricer.estimate_cost(
        model, input_tokens=input_tokens, max_output_tokens=max_output_tokens, provider=provider
    )


def register_price(
    model: str,
    *,
    input_per_mtok: Rate,
    output_per_mtok: Rate,
    cached_input_per_mtok: Rate | None = None,
    provider: str | None = None,
) -> None:
    """Price ``model`` in USD per million tokens on the default pricer, overriding bundled data."""
    default_pricer.register_price(
        model,
        input_per_mtok=input_per_mtok,
        output_per_mtok=output_per_mtok,
        cached_input_per_mtok=cached_input_per_mtok,
        provider=provider,
    )


@overload
def set_fallback(input_per_mtok: None, /) -> None: ...
@overload
def set_fallback(input_per_mtok: Rate, output_per_mtok: Rate, *, cached_input_per_mtok: Rate | None = None) -> None: ...
def set_fallback(
    input_per_mtok: Rate | None,
    output_per_mtok: Rate | None = None,
    *,
    cached_input_per_mtok: Rate | None = None,
) -> None:
    """Price unknown models on the default pricer; ``set_fallback(None)`` makes them raise again."""
    if input_per_mtok is None:
        default_pricer.set_fallback(None)
    elif output_per_mtok is None:
        raise TypeError("set_fallback() needs output_per_mtok with input_per_mtok")
    else:
        default_pricer.set_fallback(input_per_mtok, output_per_mtok, cached_input_per_mtok=cached_input_per_mtok)


# A token is about 4 characters of English. Counting UTF-8 bytes instead of characters gives the
# same figure for ASCII and a larger, safer one for scripts where a token covers fewer characters
# (accented Latin, Cyrillic, CJK); an estimate that reserves too little is the failure to avoid.
BYTES_PER_TOKEN: Final = 4
# Chat formats wrap each message in role/separator tokens (OpenAI documents 3, plus 1 for a name)
# and prime the reply with 3 more.
MESSAGE_OVERHEAD_TOKENS: Final = 4
REPLY_OVERHEAD_TOKENS: Final = 3


def approx_tokens(text: str) -> int:
    """Offline token estimate: UTF-8 bytes / 4, rounded up (0 only for ""). No tokenizer download."""
    return -(-len(text.encode("utf-8", "surrogatepass")) // BYTES_PER_TOKEN)


def approx_messages_tokens(texts: Iterable[str]) -> int:
    """Estimate for a chat prompt: each message's text plus its framing, plus the reply priming."""
    return sum(approx_tokens(t) + MESSAGE_OVERHEAD_TOKENS for t in texts) + REPLY_OVERHEAD_TOKENS

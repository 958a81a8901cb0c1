"""cycles.pricing: bundled genai-prices data, overrides, fallback, rounding, and no network."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from decimal import Decimal
from fractions import Fraction

import genai_prices
import pytest
from genai_prices.data import providers as bundled_providers
from hypothesis import given
from hypothesis import strategies as st

from cycles import pricing
from cycles.errors import UnpricedModel
from cycles.models import Amount, Unit, usd
from cycles.pricing import (
    Pricer,
    approx_messages_tokens,
    approx_tokens,
    estimate_cost,
    price_usage,
    register_price,
    set_fallback,
)


def microcents(amount: int) -> Amount:
    return Amount(unit=Unit.USD_MICROCENTS, amount=amount)


@pytest.fixture
def pricer() -> Pricer:
    return Pricer()


@pytest.fixture
def fresh_default(monkeypatch: pytest.MonkeyPatch) -> Pricer:
    """The module functions act on ``pricing.default_pricer``; give each test its own."""
    fresh = Pricer()
    monkeypatch.setattr(pricing, "default_pricer", fresh)
    return fresh


# ---- bundled prices, checked against the published per-Mtok figures -------------------------


def test_gpt_4o_matches_published_price(pricer: Pricer) -> None:
    # gpt-4o: $2.50 / Mtok input, $10 / Mtok output.
    # 1200 * 2.5 / 1e6 = $0.003, 300 * 10 / 1e6 = $0.003 -> $0.006 = 600,000 microcents.
    assert pricer.price_usage("gpt-4o", input_tokens=1200, output_tokens=300) == microcents(600_000)


def test_claude_sonnet_4_5_matches_published_price(pricer: Pricer) -> None:
    # claude-sonnet-4-5: $3 / Mtok input, $15 / Mtok output (prompts up to 200K tokens).
    # 1000 * 3 / 1e6 = $0.003, 500 * 15 / 1e6 = $0.0075 -> $0.0105.
    amount = pricer.price_usage("anthropic:claude-sonnet-4-5", input_tokens=1000, output_tokens=500)
    assert amount == usd("0.0105")


def test_long_context_tier_applies_to_the_whole_call(pricer: Pricer) -> None:
    # Above 200K prompt tokens Sonnet 4.5 bills $6 / Mtok input and $22.50 / Mtok output for every token.
    # 300,000 * 6 / 1e6 = $1.80, 1000 * 22.5 / 1e6 = $0.0225 -> $1.8225.
    amount = pricer.price_usage("claude-sonnet-4-5", input_tokens=300_000, output_tokens=1000)
    assert amount == usd("1.8225")


@pytest.mark.parametrize(
    ("model", "provider"),
    [
        ("gpt-4o", None),
        ("openai:gpt-4o", None),
        ("openai/gpt-4o", None),
        ("OpenAI:GPT-4o", None),
        ("gpt-4o", "openai"),
        ("openai:gpt-4o", "openai"),
        ("azure:gpt-4o", None),  # Azure resells OpenAI models at OpenAI's price
    ],
)
def test_provider_forms_price_the_same(pricer: Pricer, model: str, provider: str | None) -> None:
    amount = pricer.price_usage(model, input_tokens=1200, output_tokens=300, provider=provider)
    assert amount == microcents(600_000)


@pytest.mark.parametrize(
    ("dated", "base"),
    [
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("openai:gpt-4o-2024-08-06", "gpt-4o"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("anthropic/claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
    ],
)
def test_dated_model_names_price_as_their_model(pricer: Pricer, dated: str, base: str) -> None:
    def cost(name: str) -> Amount:
        return pricer.price_usage(name, input_tokens=5000, output_tokens=700)

    assert cost(dated) == cost(base)


def test_cached_input_is_cheaper(pricer: Pricer) -> None:
    # gpt-4o cache reads: $1.25 / Mtok, half the input rate.
    uncached = pricer.price_usage("gpt-4o", input_tokens=1000, output_tokens=0)
    cached = pricer.price_usage("gpt-4o", input_tokens=1000, output_tokens=0, cached_input_tokens=1000)
    assert uncached == microcents(250_000)
    assert cached == microcents(125_000)


def test_cached_tokens_must_be_part_of_input(pricer: Pricer) -> None:
    with pytest.raises(ValueError, match="input_tokens must count every prompt token"):
        pricer.price_usage("gpt-4o", input_tokens=10, output_tokens=0, cached_input_tokens=11)


def test_negative_counts_are_rejected(pricer: Pricer) -> None:
    with pytest.raises(ValueError, match="negative"):
        pricer.price_usage("gpt-4o", input_tokens=-1, output_tokens=0)


def test_time_of_day_prices_follow_the_clock(pricer: Pricer, monkeypatch: pytest.MonkeyPatch) -> None:
    # deepseek-chat is cheaper off-peak; a cache that froze the first price it saw would miss that.
    peak, off_peak = datetime(2025, 6, 1, 12, tzinfo=UTC), datetime(2025, 6, 1, 20, tzinfo=UTC)
    results = {}
    for moment in (peak, off_peak):
        monkeypatch.setattr(pricing, "_now", lambda moment=moment: moment)
        ours = pricer.price_usage("deepseek-chat", input_tokens=1_000_000, output_tokens=1_000_000)
        usage = genai_prices.Usage(input_tokens=1_000_000, output_tokens=1_000_000)
        theirs = genai_prices.calc_price(usage, "deepseek-chat", genai_request_timestamp=moment)
        assert ours == usd(theirs.total_price)
        results[moment] = ours
    assert results[peak].amount > results[off_peak].amount


def _token_only_cases() -> Iterator[tuple[str, str]]:
    for provider in bundled_providers:
        for model in provider.models:
            yield provider.id, model.id


@pytest.mark.parametrize(("input_tokens", "cached", "output"), [(1234, 234, 567), (250_001, 50_000, 4321), (7, 0, 0)])
def test_every_bundled_model_agrees_with_genai_prices(
    input_tokens: int, cached: int, output: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Our arithmetic re-implements genai-prices' for the units a token count reaches (for speed);
    # across the whole bundled data it must give genai-prices' own figure, rounded up to a microcent.
    moment = datetime(2025, 6, 1, 12, tzinfo=UTC)
    monkeypatch.setattr(pricing, "_now", lambda: moment)
    pricer = Pricer()
    usage = genai_prices.Usage(input_tokens=input_tokens, output_tokens=output, cache_read_tokens=cached)
    compared = 0
    for provider_id, model_id in _token_only_cases():
        try:
            theirs = genai_prices.calc_price(usage, model_id, provider_id=provider_id, genai_request_timestamp=moment)
        except LookupError:
            continue  # an id its own match rules do not accept; nothing to compare
        expected = math.ceil(theirs.total_price * 10**8)
        ours = pricer.price_usage(
            model_id,
            provider=provider_id,
            input_tokens=input_tokens,
            output_tokens=output,
            cached_input_tokens=cached,
        )
        assert ours.amount == expected, (provider_id, model_id)
        compared += 1
    assert compared > 2000


# ---- overrides and fallback ---------------------------------------------------------------------


def test_registered_price_overrides_bundled(pricer: Pricer) -> None:
    pricer.price_usage("gpt-4o", input_tokens=1, output_tokens=1)  # warm the cache with the bundled price
    pricer.register_price("gpt-4o", input_per_mtok=1, output_per_mtok=2)
    # 1200 * $1 + 300 * $2 per Mtok = $0.0018
    assert pricer.price_usage("openai:gpt-4o", input_tokens=1200, output_tokens=300) == usd("0.0018")


def test_registered_price_for_a_custom_model(pricer: Pricer) -> None:
    pricer.register_price("my-model", input_per_mtok=Decimal("1.0"), output_per_mtok=2.0)
    assert pricer.price_usage("my-model", input_tokens=1_000_000, output_tokens=1_000_000) == usd(3)
    # No provider at registration: the price applies whichever provider a call names.
    assert pricer.price_usage("local:my-model", input_tokens=1_000_000, output_tokens=0) == usd(1)


def test_registered_price_without_cached_rate_bills_cache_reads_as_input(pricer: Pricer) -> None:
    pricer.register_price("my-model", input_per_mtok=4, output_per_mtok=8)
    assert pricer.price_usage(
        "my-model", input_tokens=1_000_000, output_tokens=0, cached_input_tokens=1_000_000
    ) == usd(4)
    pricer.register_price("my-model", input_per_mtok=4, output_per_mtok=8, cached_input_per_mtok=1)
    assert pricer.price_usage(
        "my-model", input_tokens=1_000_000, output_tokens=0, cached_input_tokens=1_000_000
    ) == usd(1)


def test_registered_price_for_one_provider_stays_with_it(pricer: Pricer) -> None:
    pricer.register_price("llama3:8b", provider="ollama", input_per_mtok=0, output_per_mtok=0)
    assert pricer.price_usage("ollama:llama3:8b", input_tokens=10, output_tokens=10) == usd(0)
    assert pricer.price_usage("llama3:8b", provider="ollama", input_tokens=10, output_tokens=10) == usd(0)
    with pytest.raises(UnpricedModel):
        pricer.price_usage("llama3:8b", provider="vllm", input_tokens=10, output_tokens=10)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), True, "2.5"])
def test_bad_rates_are_rejected(pricer: Pricer, bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        pricer.register_price("m", input_per_mtok=bad, output_per_mtok=1)  # type: ignore[arg-type]


def test_unknown_model_raises_with_a_way_out(pricer: Pricer) -> None:
    with pytest.raises(UnpricedModel) as info:
        pricer.price_usage("acme:secret-model-7", input_tokens=1, output_tokens=1)
    message = str(info.value)
    assert "acme:secret-model-7" in message
    assert "register_price(" in message
    assert "set_fallback(" in message
    assert info.value.details == {"model": "acme:secret-model-7", "provider": None}


def test_fallback_prices_unknown_models_only(pricer: Pricer) -> None:
    pricer.set_fallback(input_per_mtok=10, output_per_mtok=30)
    assert pricer.price_usage("secret-model", input_tokens=1_000_000, output_tokens=0) == usd(10)
    assert pricer.price_usage("gpt-4o", input_tokens=1_000_000, output_tokens=0) == usd("2.5")
    pricer.register_price("secret-model", input_per_mtok=1, output_per_mtok=1)
    assert pricer.price_usage("secret-model", input_tokens=1_000_000, output_tokens=0) == usd(1)
    pricer.set_fallback(None)
    with pytest.raises(UnpricedModel):
        pricer.price_usage("other-secret-model", input_tokens=1, output_tokens=1)


def test_fallback_needs_both_rates(pricer: Pricer) -> None:
    with pytest.raises(TypeError, match="output_per_mtok"):
        pricer.set_fallback(1)  # type: ignore[call-overload]


def test_pricers_are_independent(fresh_default: Pricer) -> None:
    mine = Pricer()
    mine.register_price("gpt-4o", input_per_mtok=100, output_per_mtok=100)
    mine.set_fallback(input_per_mtok=1, output_per_mtok=1)
    assert price_usage("gpt-4o", input_tokens=1200, output_tokens=300) == microcents(600_000)
    with pytest.raises(UnpricedModel):
        price_usage("secret-model", input_tokens=1, output_tokens=1)


def test_module_functions_use_the_default_pricer(fresh_default: Pricer) -> None:
    register_price("my-model", input_per_mtok=1, output_per_mtok=2)
    assert fresh_default.price_usage("my-model", input_tokens=1_000_000, output_tokens=0) == usd(1)
    set_fallback(input_per_mtok=5, output_per_mtok=5)
    assert price_usage("secret-model", input_tokens=1_000_000, output_tokens=0) == usd(5)
    set_fallback(None)
    with pytest.raises(UnpricedModel):
        fresh_default.price_usage("secret-model", input_tokens=1, output_tokens=1)


def test_concurrent_registration_and_pricing(pricer: Pricer) -> None:
    start = threading.Barrier(9)

    def register(worker: int) -> None:
        start.wait()
        for j in range(200):
            pricer.register_price(f"m-{worker}-{j}", input_per_mtok=worker + 1, output_per_mtok=0)
            got = pricer.price_usage(f"m-{worker}-{j}", input_tokens=1_000_000, output_tokens=0)
            assert got == usd(worker + 1)

    def read() -> None:
        # Prices a cached model while registrations keep clearing the cache under it.
        start.wait()
        for _ in range(2000):
            assert pricer.price_usage("gpt-4o", input_tokens=1200, output_tokens=300).amount == 600_000

    with ThreadPoolExecutor(max_workers=9) as pool:
        futures = [pool.submit(register, i) for i in range(8)] + [pool.submit(read)]
        for future in futures:
            future.result(timeout=60)  # re-raises a worker's failure here
    assert pricer.price_usage("m-7-199", input_tokens=1_000_000, output_tokens=0) == usd(8)


# ---- rounding and estimates -------------------------------------------------------------------


def test_rounds_up_to_a_whole_microcent(pricer: Pricer) -> None:
    pricer.register_price("tiny", input_per_mtok=Decimal("0.001"), output_per_mtok=0)
    # $0.001 / Mtok is 0.1 microcent per token.
    assert pricer.price_usage("tiny", input_tokens=1, output_tokens=0) == microcents(1)
    assert pricer.price_usage("tiny", input_tokens=10, output_tokens=0) == microcents(1)
    assert pricer.price_usage("tiny", input_tokens=11, output_tokens=0) == microcents(2)
    assert pricer.price_usage("tiny", input_tokens=0, output_tokens=0) == microcents(0)
    # gpt-4o-mini cache reads, $0.075 / Mtok: 7.5 microcents for one token -> 8.
    assert pricer.price_usage("gpt-4o-mini", input_tokens=1, output_tokens=0, cached_input_tokens=1) == microcents(8)


def test_float_rates_are_taken_as_written(pricer: Pricer) -> None:
    # Decimal(0.1) is 0.1000000000000000055...; rounding up would turn that into 11 microcents.
    pricer.register_price("dime", input_per_mtok=0.1, output_per_mtok=0.1)
    assert pricer.price_usage("dime", input_tokens=1, output_tokens=0) == microcents(10)


@given(
    input_rate=st.decimals(min_value=0, max_value=1000, places=4),
    cached_rate=st.decimals(min_value=0, max_value=1000, places=4),
    output_rate=st.decimals(min_value=0, max_value=1000, places=4),
    input_tokens=st.integers(0, 10**7),
    cached_share=st.fractions(0, 1),
    output_tokens=st.integers(0, 10**7),
)
def test_charge_is_the_exact_cost_rounded_up(
    input_rate: Decimal,
    cached_rate: Decimal,
    output_rate: Decimal,
    input_tokens: int,
    cached_share: Fraction,
    output_tokens: int,
) -> None:
    pricer = Pricer()
    pricer.register_price(
        "m", input_per_mtok=input_rate, output_per_mtok=output_rate, cached_input_per_mtok=cached_rate
    )
    cached = int(input_tokens * cached_share)
    charged = pricer.price_usage(
        "m", input_tokens=input_tokens, output_tokens=output_tokens, cached_input_tokens=cached
    ).amount
    exact_usd = (
        Fraction(input_rate) * (input_tokens - cached)
        + Fraction(cached_rate) * cached
        + Fraction(output_rate) * output_tokens
    ) / 10**6
    exact = exact_usd * 10**8
    assert charged - 1 < exact <= charged


def test_estimate_assumes_every_output_token(pricer: Pricer) -> None:
    estimate = pricer.estimate_cost("gpt-4o", input_tokens=1200, max_output_tokens=1024)
    # 1200 * 2.5 / 1e6 + 1024 * 10 / 1e6 = $0.01324
    assert estimate == usd("0.01324")
    actual = pricer.price_usage("gpt-4o", input_tokens=1200, output_tokens=1000, cached_input_tokens=600)
    assert actual.amount < estimate.amount


def test_module_estimate(fresh_default: Pricer) -> None:
    assert estimate_cost("openai:gpt-4o", input_tokens=1200, max_output_tokens=1024) == usd("0.01324")


# ---- approx_tokens ------------------------------------------------------------------------------


def test_approx_tokens_is_about_four_characters() -> None:
    assert approx_tokens("") == 0
    assert approx_tokens("a") == 1
    assert approx_tokens("abcd") == 1
    assert approx_tokens("abcde") == 2
    assert approx_tokens("x" * 4000) == 1000


def test_approx_tokens_counts_non_latin_text_higher() -> None:
    # Three CJK characters are 9 UTF-8 bytes: 3 tokens, not the 1 a character count would give.
    assert approx_tokens("日本語") == 3
    assert approx_tokens("\ud800") == 1  # a lone surrogate does not crash the estimate


@given(st.text(), st.text())
def test_approx_tokens_grows_with_text(a: str, b: str) -> None:
    assert approx_tokens(a + b) >= approx_tokens(a)
    assert (approx_tokens(a) > 0) == (a != "")


def test_approx_messages_tokens_adds_framing() -> None:
    assert approx_messages_tokens([]) == 3
    assert approx_messages_tokens(["abcd", "abcdefgh"]) == (1 + 4) + (2 + 4) + 3


# ---- no network -----------------------------------------------------------------------------


def _refuse(*args: object, **kwargs: object) -> None:
    raise OSError("network access attempted while pricing")


def test_pricing_makes_no_network_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", _refuse)
    monkeypatch.setattr(socket, "create_connection", _refuse)
    monkeypatch.setattr(socket, "getaddrinfo", _refuse)
    pricer = Pricer()
    assert pricer.price_usage("openai:gpt-4o", input_tokens=1200, output_tokens=300).amount == 600_000
    with pytest.raises(UnpricedModel):
        pricer.price_usage("never-heard-of-it", input_tokens=1, output_tokens=1)


def test_first_use_loads_bundled_data_without_network() -> None:
    # In a fresh interpreter, so importing genai-prices and loading its data is covered too.
    code = textwrap.dedent(
        """
        import socket, threading

        def refuse(*args, **kwargs):
            raise OSError("network access attempted while pricing")

        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.create_connection = socket.getaddrinfo = refuse
        before = set(threading.enumerate())
        from cycles.pricing import price_usage
        print(price_usage("anthropic:claude-sonnet-4-5", input_tokens=1000, output_tokens=500).amount)
        print(len(set(threading.enumerate()) - before))  # no background updater started
        """
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1050000", "0"]


def test_public_names() -> None:
    assert set(pricing.__all__) == {
        "Pricer",
        "approx_messages_tokens",
        "approx_tokens",
        "default_pricer",
        "estimate_cost",
        "price_answer",
        "price_usage",
        "register_price",
        "set_fallback",
    }


def test_a_response_is_priced_by_the_model_that_answered(caplog: pytest.LogCaptureFixture) -> None:
    pricing.register_price("answer-cheap", input_per_mtok=1, output_per_mtok=2)
    pricing.register_price("answer-big", input_per_mtok=10, output_per_mtok=20)
    big = pricing.price_answer("answer-big", requested="answer-cheap", input_tokens=1000, output_tokens=100)
    assert big == pricing.price_usage("answer-big", input_tokens=1000, output_tokens=100)
    with caplog.at_level("WARNING", logger="cycles.pricing"):
        unknown = pricing.price_answer("nobody-knows-me", requested="answer-cheap", input_tokens=1000, output_tokens=9)
    assert unknown == pricing.price_usage("answer-cheap", input_tokens=1000, output_tokens=9)
    assert "nobody-knows-me" in caplog.text

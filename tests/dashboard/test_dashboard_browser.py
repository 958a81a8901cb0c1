"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright).

An operator signs in, sees a budget someone set with the CLI, freezes it (and a reserve under it is
then refused over the API), force-releases a live reservation and opens the shadow report. Each
step leaves a screenshot in ``.test-reports/dashboard/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cycles import Action, BudgetFrozen, Cycles, ReservationStatus, Subject, usd

from .conftest import ADMIN_KEY

CHROMIUM = os.environ.get("CYCLES_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[2] / ".test-reports" / "dashboard"
LLM = Action("llm.completion", "openai:gpt-4o")


def cli(url: str, *args: str) -> str:
    """The real command line, in its own process."""
    done = subprocess.run(
        [sys.executable, "-m", "cycles.cli", "--ledger", url, *args], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: ./run test installs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


def settled(page: Any) -> None:
    """Wait until htmx has finished swapping and settling (boosted links swap the body in place)."""
    page.wait_for_function(
        "() => window.htmx !== undefined && !document.querySelector('.htmx-request, .htmx-swapping, .htmx-settling')"
    )


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_operator_signs_in_freezes_releases_and_reads_the_shadow_report(browser: Any, served: tuple[str, str]) -> None:
    ledger_url, base = served
    cli(ledger_url, "budget", "set", "tenant:acme", "50")
    cli(ledger_url, "budget", "set", "tenant:acme/workflow:nightly", "12.50")
    cli(ledger_url, "budget", "set", "tenant:acme/workflow:support", "5")
    cli(ledger_url, "budget", "set", "tenant:globex", "20")
    cli(ledger_url, "budget", "set", "tenant:globex/agent:triage", "0.50")
    api_key = subprocess.run(
        [sys.executable, "-m", "cycles.cli", "keys", "--ledger", ledger_url, "create", "--tenant", "acme"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with Cycles(ledger_url, heartbeat=False) as cy:
        held = cy.reserve(Subject(tenant="acme", workflow="support", agent="writer"), LLM, usd(0.75), ttl_ms=600_000)
        for _ in range(3):
            r = cy.reserve(Subject(tenant="acme", workflow="nightly"), LLM, usd(1.10))
            assert r.reservation_id
            cy.commit(r.reservation_id, usd(0.95))
    with Cycles(ledger_url, mode="shadow", heartbeat=False) as shadow:  # 4 calls of 0.20 on a 0.50 budget
        for _ in range(4):
            with shadow.guard(Subject(tenant="globex", agent="triage"), LLM, estimate=usd(0.20)) as g:
                g.commit(usd(0.20))
    assert held.reservation_id

    page = browser.new_page(viewport={"width": 1440, "height": 900})
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before freeze / force release

    # Sign in: a wrong key is refused, the admin key opens the overview.
    page.goto(base + "/dashboard")
    assert page.url.endswith("/dashboard/login")
    page.fill("#key", "not-the-key")
    page.click("button[type=submit]")
    assert "invalid" in page.inner_text(".flash-error").lower()
    shot(page, "01-login")
    page.fill("#key", ADMIN_KEY)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=who]")
    assert page.inner_text("[data-testid=who]") == "admin"
    assert page.inner_text("[data-testid=budget-count]") == "5"
    assert "tenant:acme/workflow:nightly" in page.inner_text("main")  # among the closest to their limits
    shot(page, "02-overview")

    # The budget set with the CLI, in the tree, with its numbers.
    page.click("nav a[data-page=budgets]")
    settled(page)
    row = page.locator("tr[data-scope='tenant:acme/workflow:support']")
    row.wait_for()
    assert "$5.00" in row.inner_text() and "$0.75" in row.inner_text()  # allocated, reserved
    assert row.locator("[data-testid=status]").inner_text() == "active"
    shot(page, "03-budgets")

    # Freeze it: the row says so, and a reserve under it is refused over the API.
    row.get_by_role("button", name="Freeze").click()
    page.wait_for_selector("tr[data-scope='tenant:acme/workflow:support'] .badge-frozen")
    assert "froze tenant:acme/workflow:support" in page.inner_text("#budgets .flash-ok").lower()
    with Cycles(base, api_key=api_key) as remote, pytest.raises(BudgetFrozen):
        remote.reserve(Subject(tenant="acme", workflow="support"), LLM, usd(0.10))
    shot(page, "03-frozen")

    # The refusal is on the overview: 1 reserve denied (the frozen budget), 2 would-denies (shadow mode).
    page.click("nav a[data-page=overview]")
    settled(page)
    assert page.inner_text("[data-testid=denials]") == "1 / 2"
    shot(page, "04-overview-after-refusal")
    page.click("nav a[data-page=budgets]")
    settled(page)
    nightly = page.locator("tr[data-scope='tenant:acme/workflow:nightly']")
    nightly.wait_for()

    # Fund another budget in place.
    nightly.locator("input[name=amount]").fill("2.50")
    nightly.get_by_role("button", name="Fund").click()
    page.wait_for_selector("text=funded tenant:acme/workflow:nightly")
    with Cycles(ledger_url) as cy:
        assert cy.budgets.get("tenant:acme/workflow:nightly").allocated == usd(15)

    # Live reservations: force-release the one held on the frozen budget.
    page.click("nav a[data-page=reservations]")
    settled(page)
    live = page.locator(f"tr[data-reservation='{held.reservation_id}']")
    live.wait_for()
    shot(page, "05-reservations")
    live.get_by_role("button", name="Force release").click()
    page.wait_for_selector(f"#r-{held.reservation_id}.row-released")
    with Cycles(ledger_url) as cy:
        assert cy.get_reservation(held.reservation_id).status is ReservationStatus.RELEASED
        assert cy.budgets.get("tenant:acme/workflow:support").reserved == usd(0)

    # Events: the audit log has the dashboard's own actions; reservations filter and export.
    page.click("nav a[data-page=events]")
    settled(page)
    page.click("a[data-kind=audit]")
    page.wait_for_selector("text=releaseReservation")
    audit = page.inner_text("main")
    assert "setBudgetStatus" in audit and "fundBudget" in audit and "dashboard" in audit
    shot(page, "06-audit")
    page.goto(base + "/dashboard/events?kind=reservations&tenant=acme&status=COMMITTED")
    assert page.locator("tbody tr").count() == 3
    export = page.request.get(base + "/dashboard/events?kind=reservations&tenant=acme&status=COMMITTED&format=csv")
    assert export.ok and export.text().count("\n") == 4  # header + 3 rows
    audit_json = page.request.get(base + "/dashboard/events?kind=audit&operation=setBudgetStatus&format=json").json()
    assert [(a["operation"], a["resource_id"], a["status"]) for a in audit_json] == [
        ("setBudgetStatus", "tenant:acme/workflow:support", 200)
    ]

    # The shadow report: 2 of the 4 globex calls would have been denied. (The events page was
    # filtered to acme and the filter follows the navigation: pick all tenants again.)
    page.click("nav a[data-page=shadow]")
    settled(page)
    assert "No call would have been denied." in page.inner_text("[data-testid=shadow-summary]")
    settled(page)  # htmx has wired the new page's filter form
    page.select_option("select[name=tenant]", "")
    page.wait_for_selector("text=calls would have been denied")
    summary = page.inner_text("[data-testid=shadow-summary]")
    assert "2 calls would have been denied" in summary
    assert "Enforcement would have prevented $0.4000 of spend" in summary
    assert page.locator("svg.chart").count() >= 1
    assert "tenant:globex/agent:triage" in page.inner_text("main")
    shot(page, "07-shadow")

    # A tenant's API key: a read-only view of that tenant alone.
    page.click("text=Sign out")
    page.fill("#key", api_key)
    page.click("button[type=submit]")
    page.wait_for_selector("[data-testid=who]")
    assert page.inner_text("[data-testid=who]") == "tenant acme (read-only)"
    page.click("nav a[data-page=budgets]")
    settled(page)
    page.locator("tr[data-scope='tenant:acme']").wait_for()
    assert page.locator("tr[data-scope='tenant:globex']").count() == 0
    assert page.get_by_role("button", name="Freeze").count() == 0
    refused = page.request.post(
        base + "/dashboard/budgets/status",
        form={"scope": "tenant:acme", "status": "FROZEN"},
        headers={"HX-Request": "true"},
    )
    assert "read-only" in refused.text()
    shot(page, "08-read-only")
    page.close()

"""The policy file: parsing, one-line typed errors, which rule decides a tool, and ``proxy --check``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cycles import InvalidRequest, Subject, risk_points, tokens, usd
from cycles_mcp.cli import main
from cycles_mcp.policy import PolicyError, load_policy, parse_policy
from tests.mcp.conftest import ASKING, UPSTREAM

FULL = """
ledger = "memory://"
tenant = "acme"
workspace = "prod"
agent = "support-bot"
deny = ["drop_*", "delete_*"]
default_cost = { risk_points = 1 }
session_budget = [{ risk_points = 60 }, { usd = 0.50 }]

[tools."deploy*"]
cost = { risk_points = 50 }

[tools."deploy_preview"]
cost = { risk_points = 5, usd = 0.02 }

[tools."search"]
cost = { usd = 0.01 }

[tools."read_*"]
gate = false

[tools."db_*_admin"]
deny = true
"""


def test_full_policy_parses() -> None:
    policy = parse_policy(FULL)
    assert policy.subject == Subject(tenant="acme", workspace="prod", agent="support-bot")
    assert policy.ledger == "memory://"
    assert policy.session_budget == (risk_points(60), usd(0.5))
    assert policy.default_cost == (risk_points(1),)


@pytest.mark.parametrize(
    ("tool", "denied", "cost", "rule"),
    [
        ("drop_users", True, (), "drop_*"),
        ("deploy", False, (risk_points(50),), '[tools."deploy*"]'),
        ("deploy_prod", False, (risk_points(50),), '[tools."deploy*"]'),
        ("deploy_preview", False, (risk_points(5), usd(0.02)), '[tools."deploy_preview"]'),  # exact beats glob
        ("search", False, (usd(0.01),), '[tools."search"]'),
        ("read_file", False, (), '[tools."read_*"]'),  # gate = false
        ("db_users_admin", True, (), '[tools."db_*_admin"]'),
        ("anything_else", False, (risk_points(1),), "default_cost"),
    ],
)
def test_which_rule_decides(tool: str, denied: bool, cost: tuple[object, ...], rule: str) -> None:
    match = parse_policy(FULL).match(tool)
    assert (match.denied, match.cost, match.rule) == (denied, cost, rule)


def test_most_specific_glob_wins_and_ties_go_to_the_first_written() -> None:
    policy = parse_policy(
        'tenant = "a"\n[tools."*"]\ncost = { tokens = 1 }\n[tools."git_*"]\ncost = { tokens = 2 }\n'
        '[tools."git_push*"]\ncost = { tokens = 3 }\n[tools."git_pus?"]\ncost = { tokens = 4 }\n'
    )
    assert policy.match("git_status").cost == (tokens(2),)
    assert policy.match("git_push_force").cost == (tokens(3),)
    assert policy.match("git_push").cost == (tokens(3),)  # "git_push*" and "git_pus?" tie on 8: first written
    assert policy.match("ls").cost == (tokens(1),)


def test_no_default_cost_leaves_unmatched_tools_ungated_and_allow_lists_restrict() -> None:
    policy = parse_policy('tenant = "a"\nallow = ["search", "read_*"]\n')
    assert not policy.match("search").gated and not policy.match("search").denied
    assert policy.match("deploy").denied and policy.match("deploy").rule == "allow (not listed)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('tenant = "a"\nbudget = 5\n', "budget: unknown key"),
        ("deny = []\n", "tenant: the policy needs a subject"),
        ('tenant = "a b"\n', "tenant:"),
        ('tenant = "a"\ndefault_cost = { dollars = 1 }\n', "default_cost.dollars: unknown unit"),
        ('tenant = "a"\ndefault_cost = { risk_points = -1 }\n', "must not be negative"),
        ('tenant = "a"\ndefault_cost = { risk_points = 1.5 }\n', "risk_points are whole numbers"),
        ('tenant = "a"\ndefault_cost = 5\n', "default_cost: must be a table"),
        ('tenant = "a"\nsession_budget = [{ usd = 1 }, { usd = 2 }]\n', "names the same unit twice"),
        ('tenant = "a"\n[tools."x"]\nprice = 1\n', 'tools."x".price: unknown key'),
        ('tenant = "a"\n[tools."x"]\n', 'tools."x": needs cost'),
        ('tenant = "a"\ndeny = "drop_*"\nttl_ms = 5\n', "ttl_ms: must be an integer"),
        ('tenant = "a"\noverage_policy = "SOMETIMES"\n', "overage_policy: must be one of"),
        ('tenant = "a"\non_failure = "sometimes"\n', "on_failure: must be"),
        ('tenant = "a"\n[tools."x"]\ncost = { credits = 1 }\non_failure = 1\n', 'tools."x".on_failure: must be'),
        ("tenant = \n", "not valid TOML"),
    ],
)
def test_policy_errors_are_one_line_and_typed(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, source="p.toml")
    assert isinstance(caught.value, InvalidRequest)
    assert message in str(caught.value) and str(caught.value).startswith("INVALID_REQUEST: p.toml: ")
    assert "\n" not in str(caught.value)


def test_a_single_deny_string_is_a_list() -> None:
    assert parse_policy('tenant = "a"\ndeny = "drop_*"\n').deny == ("drop_*",)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        load_policy(tmp_path / "nope.toml")


def test_check_prints_what_each_upstream_tool_costs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(FULL, encoding="utf-8")
    assert main(["proxy", "--check", str(policy), "--", sys.executable, str(UPSTREAM)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "session budget:  60 risk points, $0.5000" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ") and "    [" not in line}
    assert "50 risk points" in lines["deploy"]
    assert "denied" in lines["drop_table"]
    assert "$0.0100" in lines["search"]
    assert "1 risk points (by default_cost)" in lines["crash"]


def test_check_shows_the_kinds_the_upstream_tools_declare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text('tenant = "a"\ndefault_cost = { risk_points = 1 }\n[sampling]\ncost = { tokens = 500 }\n')
    assert main(["proxy", "--check", str(policy), "--", sys.executable, str(ASKING)]) == 0
    out = capsys.readouterr().out
    assert "sampling:        500 tokens (by [sampling])" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("    ")}
    assert lines["send_email_digest"].endswith("kind db.query")
    assert "denied" in lines["erp_post"] and "INVALID_REQUEST" in lines["erp_post"]


def test_sampling_rule() -> None:
    assert parse_policy('tenant = "a"\n').sampling_match().describe() == "forwarded ungated"
    priced = parse_policy('tenant = "a"\n[sampling]\ncost = { usd = 0.02 }\nkind = "llm.structured_output"\n')
    assert priced.sampling_match().cost == (usd(0.02),) and priced.sampling_match().kind == "llm.structured_output"
    assert parse_policy('tenant = "a"\n[sampling]\ndeny = true\n').sampling_match().denied
    with pytest.raises(PolicyError, match=r"\[sampling\]: needs cost"):
        parse_policy('tenant = "a"\n[sampling]\nkind = "llm.completion"\n')


def test_command_line_errors_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('tenant = "a"\n[tools."x"]\ncost = { usd = "lots" }\n', encoding="utf-8")
    for args, expected in [
        (["proxy", "--check", str(bad)], 'tools."x".cost.usd: must be a number'),
        (["proxy", "--policy", str(bad)], 'tools."x".cost.usd: must be a number'),
        (["proxy", "--policy", str(tmp_path / "missing.toml"), "--", "x"], "cannot read the policy file"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "cycles_mcp.cli", *args], capture_output=True, text=True, timeout=60, check=False
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and expected in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_relative_sqlite_ledger_is_relative_to_the_policy_file(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    policy = tmp_path / "conf" / "p.toml"
    policy.write_text('ledger = "sqlite:///data/ledger.db"\ntenant = "a"\n', encoding="utf-8")
    assert load_policy(policy).ledger == f"sqlite:///{(tmp_path / 'conf' / 'data' / 'ledger.db').as_posix()}"
    policy.write_text('ledger = "sqlite:////abs/ledger.db"\ntenant = "a"\n', encoding="utf-8")
    assert load_policy(policy).ledger == "sqlite:////abs/ledger.db"

"""``args_fingerprint``: the one place a tool call's name and arguments become the loop guard's key."""

from __future__ import annotations

from cycles import Action, args_fingerprint, with_args_fingerprint


def test_equal_calls_have_equal_fingerprints_whatever_the_key_order_or_encoding() -> None:
    as_object = args_fingerprint("lookup", {"order": 42, "verbose": True})
    assert args_fingerprint("lookup", {"verbose": True, "order": 42}) == as_object
    assert args_fingerprint("lookup", '{"verbose": true, "order": 42}') == as_object  # an OpenAI tool call's text
    assert args_fingerprint("lookup", b'{"order":42,"verbose":true}') == as_object


def test_other_arguments_or_another_tool_differ() -> None:
    base = args_fingerprint("lookup", {"order": 42})
    assert args_fingerprint("lookup", {"order": 43}) != base
    assert args_fingerprint("lookup", {"order": "42"}) != base
    assert args_fingerprint("search", {"order": 42}) != base
    assert args_fingerprint("lookup", "order 42") != args_fingerprint("lookup", "order 43")  # plain text


def test_the_fingerprint_rides_on_the_action_and_keeps_its_policy_keys() -> None:
    action = Action("message.email.send", "send_email", policy_keys={"recipient_domain": "example.com"})
    marked = with_args_fingerprint(action, {"to": "a@example.com"})
    assert marked.policy_keys is not None and marked.policy_keys["recipient_domain"] == "example.com"
    assert marked.policy_keys["custom"]["args_fingerprint"] == args_fingerprint("send_email", {"to": "a@example.com"})
    assert action.policy_keys == {"recipient_domain": "example.com"}  # the original is untouched

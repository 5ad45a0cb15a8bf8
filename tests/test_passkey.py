"""`agentloop eval passkey` / `passkey-online` scoring."""

from __future__ import annotations

import pytest

from agentloop.evals.passkey import correct, digits_recalled


@pytest.mark.parametrize("answer,share", [(" 73691.", 1.0), (" 7369.", 0.8), (" 73961 or 7", 0.8),
                                          (" 42.", 0.0), (" a term used in computer science", 0.0)])
def test_digits_recalled_counts_the_key_digits_in_order(answer, share):
    assert digits_recalled(answer, "73691") == pytest.approx(share)


@pytest.mark.parametrize("answer,expected", [(" 73691.", True), (" 736910", False), (" 7369 1", False)])
def test_correct_needs_the_key_as_one_number(answer, expected):
    assert correct(answer, "73691") is expected

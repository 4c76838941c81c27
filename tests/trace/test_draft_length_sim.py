"""experiments.draft_length_sim: bytes per emitted token of a hand-made trace's demand misses."""

from __future__ import annotations

import pytest
from test_accuracy import _trace

from experiments.draft_length_sim import bytes_per_token, emitted_tokens


def test_emitted_tokens_are_accepted_drafts_plus_one_per_decode_row():
    assert emitted_tokens(_trace()) == 3  # row 1 accepted 1 draft (2 tokens), row 2 accepted 0 (1 token)


def test_bytes_per_token_divides_counted_misses_by_emitted_tokens():
    rows = {(r["k"], r["slots"], r["policy"]): r for r in bytes_per_token(
        _trace(), True, 2, [3, 8], ["lru"], expert_bytes=10**9)}
    k = max(key[0] for key in rows)
    assert rows[(k, 8, "lru")]["misses_per_token"] == pytest.approx(4 / 3)  # only first sightings miss
    assert rows[(k, 8, "lru")]["gb_per_token"] == pytest.approx(4 / 3)
    assert rows[(k, 3, "lru")]["misses_per_token"] == pytest.approx(14 / 3)  # LRU misses all 14 counted accesses
    assert rows[(k, 8, "lru")]["experts_per_token"] == pytest.approx(14 / 3)
    assert rows[(k, 3, "belady")]["misses_per_token"] < rows[(k, 3, "lru")]["misses_per_token"]
    no_sd = bytes_per_token(_trace(), False, 2, [8], ["lru"], expert_bytes=10**9)
    assert {r["k"] for r in no_sd} == {0}
    assert no_sd[0]["experts_per_token"] == pytest.approx(11 / 3)  # committed tokens one at a time

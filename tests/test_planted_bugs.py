"""experiments.planted_bugs: a planted bug fires and fails the test that guards it; a bad name is refused."""

from __future__ import annotations

import pytest

from experiments.planted_bugs import BUGS, pytest_configure, run_bug


def test_a_kv_position_lost_after_acceptance_fails_the_lossless_test(tmp_path):
    row = run_bug("kv_position_lost", ["tests/methods/test_spmoe.py::test_lossless_in_every_cutoff_mode"], 1,
                  tmp_path / "fired.json")
    assert row["fired"] > 0
    assert row["caught"], row
    assert row["failed_tests"][0].startswith("tests/methods/test_spmoe.py::test_lossless_in_every_cutoff_mode")
    assert row["reasons"][0].startswith("assert [[")  # the token comparison, not a length guard


def test_an_unknown_bug_is_refused(monkeypatch):
    monkeypatch.setenv("SPMOE_PLANT", "off_by_one")
    with pytest.raises(ValueError, match="valid: " + ", ".join(BUGS)):
        pytest_configure(None)

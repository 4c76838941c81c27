"""spmoe.summary helpers that must not fail a finished run."""

from __future__ import annotations

import subprocess

import spmoe.summary as summary


def test_git_sha_is_none_when_git_hangs(monkeypatch):
    def hangs(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs.get("timeout", 5))

    monkeypatch.setattr(summary.subprocess, "run", hangs)
    assert summary.git_sha() is None


def test_git_sha_is_none_without_git(monkeypatch):
    def missing(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(summary.subprocess, "run", missing)
    assert summary.git_sha() is None


def test_git_sha_says_when_tracked_files_differ_from_it(monkeypatch):
    outputs = {"rev-parse": "abc123\n", "status": ""}

    def run(args, **kwargs):
        return subprocess.CompletedProcess(args, 0, stdout=outputs[args[1]], stderr="")

    monkeypatch.setattr(summary.subprocess, "run", run)
    assert summary.git_sha() == "abc123"
    outputs["status"] = " M spmoe/summary.py\n"
    assert summary.git_sha() == "abc123+dirty"
    outputs["rev-parse"] = ""
    assert summary.git_sha() is None

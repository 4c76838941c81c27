"""Belady oracle on hand-made sequences."""

from __future__ import annotations

import pytest

from spmoe.trace.oracle import belady_misses, runtime_efficiency
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import LruPolicy

A, B, C, D = (0, 0), (0, 1), (0, 2), (0, 3)


def seq(*keys, counted=True):
    return [(k, counted) for k in keys]


def test_belady_textbook_example():
    # 3 slots: A B C D A B E... classic: optimal evicts the farthest next use
    s = seq(A, B, C, D, A, B, C, D)
    # A,B,C miss; D misses and evicts C (used last); A,B hit; C misses evicting A or B (never again); D hit
    assert belady_misses(s, 3) == 5


def test_belady_never_worse_than_lru():
    import random

    rng = random.Random(0)
    keys = [(0, i) for i in range(6)]
    s = [(rng.choice(keys), True) for _ in range(300)]
    lru = ExpertCache(3, 1, __import__("torch").float32, "cpu", LruPolicy())
    for k, _ in s:
        lru.access(k)
    assert belady_misses(s, 3) <= lru.misses


def test_uncounted_warmup():
    s = seq(A, B, counted=False) + seq(A, B, C)
    assert belady_misses(s, 2) == 1  # only C misses among counted accesses
    with pytest.raises(ValueError):
        belady_misses(s, 0)


def test_runtime_efficiency():
    # 55.5 GB/s, 5.55 GB per token -> 100 ms of copies + 10 ms compute = 110 ms floor
    assert runtime_efficiency(121.0, 5.55e9, 55.5, 10.0) == pytest.approx(1.1)

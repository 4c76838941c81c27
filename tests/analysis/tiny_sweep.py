"""A tiny CPU sweep made by the project's own runs (spmoe.experiment.run_cases), with data for every figure.

Two jobs of one experiment, as `python run.py -m experiment=... method.num_slots=12,24` would lay them out:
- `slots12/`: spmoe (auto cutoff), L0 (fixed cutoff 0), no_prefetch (cutoff off), spmoe_k3 (k = 3),
  lru, lru_k3 and lru_nosd, at 12 expert slots;
- `slots24/`: spmoe and lru at 24 expert slots.
Tiny twin target and tiny draft, one prompt, 6 new tokens, two interleaved rounds (about 20 s on 2 cores).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.experiment import Case, run_cases

CASES_12 = {
    "spmoe": ("spmoe", {}, 1), "L0": ("spmoe", {"mode": "fixed", "layer": 0}, 1),
    "no_prefetch": ("spmoe", {"mode": "off"}, 1), "spmoe_k3": ("spmoe", {}, 3),
    "lru": ("lru", {}, 1), "lru_k3": ("lru", {}, 3), "lru_nosd": ("lru_nosd", {}, 1),
}
CASES_24 = {"spmoe": ("spmoe", {}, 1), "lru": ("lru", {}, 1)}


def _case(root: Path, name: str, method: str, cutoff: dict, k: int, slots: int) -> Case:
    cfg = tiny_run_config(method=method, draft=load_preset("draft", "tiny"), num_prompts=1, max_new_tokens=6)
    cfg.method.num_slots = slots
    cfg.method.cutoff = replace(cfg.method.cutoff, **cutoff)
    cfg.spec = replace(cfg.spec, num_draft_tokens=k)
    return Case(name, cfg, root / name)


def make_tiny_sweep(root: Path) -> Path:
    for job, slots, cases in (("slots12", 12, CASES_12), ("slots24", 24, CASES_24)):
        run_cases([_case(root / job, name, *spec, slots) for name, spec in cases.items()], rounds=2,
                  experiment="tiny_sweep")
    return root

"""
Cutoff-layer policy: prefetch MoE layers 0..L* only; deeper layers load on demand.

Latency model (one SD step; all times in ms; layers indexed 0..L-1 in MoE-layer order):
    k    draft tokens per step              t_d  draft compute per layer per token
    t_v  verify compute per layer           t_e  one expert's host->device copy (bytes / bandwidth)
    n    experts copied per prefetched layer: n = u_k * (1 - r), where u_k = E (1 - (1 - A/E)^k) is
         the expected union of the k draft tokens' top-A predictions among E experts (uniform routing)
         and r = S / (L E) the resident fraction of a cache of S slots
    T_req(l) = (l + 1) t_d                       requests of layer l leave the draft's first token
    C(l)     = max(C(l-1), T_req(l)) + n t_e     prefetches of layer l land (copies serialize), C(-1) = 0
    V(l)     = k L t_d + l t_v                   verification reaches layer l
A layer's prefetch lands just in time iff C(l) <= V(l); it fits iff (l + 1) n <= S - A (prefetched
experts stay protected until verification passes their layer, and the layer being verified needs
A slots). L* = the deepest l for which every layer 0..l lands in time and fits (-1: prefetch
nothing). Modes: `auto` (L* from this model and a profile), `fixed` (given L*), `all` (no cutoff),
`off` (no prefetch).

A profile holds the measured t_d, t_v, t_e for one model x draft x device x budget; `auto` reuses
the JSON file under `cutoff.profile_dir` when it exists and writes it otherwise.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from spmoe.config import CutoffConfig
from spmoe.io import write_json_atomic

MODES = ("auto", "fixed", "all", "off")


@dataclass
class Profile:
    draft_layer_ms: float  # t_d
    verify_layer_ms: float  # t_v
    expert_load_ms: float  # t_e
    num_layers: int  # L
    num_experts: int  # E
    top_k: int  # A
    num_slots: int  # S


def expected_union(num_experts: int, top_k: int, k: int) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** k)


def cutoff_layer(p: Profile, k: int) -> int:
    """L* of the latency model above (-1 when not even layer 0 pays off)."""
    resident = min(1.0, p.num_slots / (p.num_layers * p.num_experts))
    n = expected_union(p.num_experts, p.top_k, k) * (1 - resident)
    landed, best = 0.0, -1
    for layer in range(p.num_layers):
        landed = max(landed, (layer + 1) * p.draft_layer_ms) + n * p.expert_load_ms
        verify_at = k * p.num_layers * p.draft_layer_ms + layer * p.verify_layer_ms
        if landed > verify_at or (layer + 1) * n > p.num_slots - p.top_k:
            break
        best = layer
    return best


def choose_cutoff(cfg: CutoffConfig, num_layers: int, profile: Profile | None, k: int) -> int:
    """The last prefetched MoE-layer index (-1 = none) for a cutoff mode."""
    if cfg.mode not in MODES:
        raise ValueError(f"unknown cutoff.mode {cfg.mode!r}; valid: {list(MODES)}")
    if cfg.mode == "off":
        return -1
    if cfg.mode == "all":
        return num_layers - 1
    if cfg.mode == "fixed":
        if cfg.layer is None or not -1 <= cfg.layer < num_layers:
            raise ValueError(f"cutoff.mode=fixed needs cutoff.layer in [-1, {num_layers - 1}], got {cfg.layer}")
        return cfg.layer
    if profile is None:
        raise ValueError("cutoff.mode=auto needs a profile")
    return cutoff_layer(profile, k)


def load_profile(path: Path) -> Profile | None:
    return Profile(**json.loads(path.read_text())) if path.is_file() else None


def save_profile(path: Path, profile: Profile) -> None:
    write_json_atomic(path, asdict(profile))

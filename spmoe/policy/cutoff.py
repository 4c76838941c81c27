"""
Cutoff-layer policy: prefetch MoE layers 0..L* only; deeper layers load on demand.

Latency model (one SD step; all times in ms; layers indexed 0..L-1 in MoE-layer order):
    k    draft tokens per step              t_d  draft compute per layer per token
    t_v  verify compute per layer           t_e  one expert's host->device copy (bytes / bandwidth)
    n    experts copied per prefetched layer: n = u_k * (1 - r), where u_k = E (1 - (1 - A/E)^k) is
         the expected union of the k draft tokens' top-A predictions among E experts (uniform routing)
         and r = S / (L E) the resident fraction of a cache of S slots
    r_l  predictor set recall at layer l: the fraction of the experts verification routes that the
         prediction named (measured, `Profile.layer_recall`; unknown = 1)
    T_req(l) = (l + 1) t_d                       requests of layer l leave the draft's first token
    C(l)     = max(C(l-1), T_req(l)) + n t_e     prefetches of layer l land (copies serialize), C(-1) = 0
    V(l)     = k L t_d + l t_v                   verification reaches layer l (V(0): verification starts)
A layer's prefetch lands just in time iff C(l) <= V(l); it fits iff (l + 1) n <= S - A (prefetched
experts stay protected until verification passes their layer, and the layer being verified needs
A slots).
Recall. Layer l's n copies take n t_e of the copy engine whether or not they are used, so C(l)
is unchanged; but only r_l n of them save a stall (t_e each, the on-demand load verification no
longer makes), while the (1 - r_l) n wasted ones cost bus time. Wasted bus time is free while it
runs before verification starts; the part of layer l's copy interval [C(l) - n t_e, C(l)] that
overlaps verification, o_l = min(n t_e, max(0, C(l) - V(0))), delays verification's on-demand loads
of earlier layers' misses (one bus, copies serialize). Charging each wasted copy its share of o_l:
    worth(l)  iff  r_l > 0  and  r_l n t_e >= (1 - r_l) o_l,  i.e.  r_l >= r_min(l) = o_l / (n t_e + o_l)
so r_min(l) = 0 for copies hidden before verification (any useful copy pays) and rises to 1/2 for
copies that run entirely during verification (one useful copy must pay for one wasted copy).
The charge is conservative: it assumes verification always has an on-demand load waiting.
L* = the deepest l for which every layer 0..l lands in time, fits and is worth it (-1: prefetch
nothing). Without recall (r_l = 1) worth(l) always holds and L* is the timing/memory cutoff alone.
Modes: `auto` (L* from this model and a profile), `fixed` (given L*), `all` (no cutoff), `off`
(no prefetch).

A profile holds the measured t_d, t_v, t_e and r_l, and how t_e was checked against the measured
pinned bandwidth; `spmoe.policy.profile` measures it and caches it on disk keyed by everything it
depends on.
"""

from __future__ import annotations

from dataclasses import dataclass

from spmoe.config import CutoffConfig

MODES = ("auto", "fixed", "all", "off")
PROFILE_VERSION = 6  # 2: + layer_recall; 3: medians after warm-up; 4: content keys, copy check vs bandwidth;
# 5: t_d through the run's decoder (graphs replayed) and quantized sites, t_v from the full-precision draft;
# 6: t_v of a quantized copy of the target scaled by its bits (its weights are buffers)
COPY_CHECKS = ("ok", "flagged", "skipped")  # t_e within tolerance of bytes/bandwidth; off after re-measuring; not checked


@dataclass
class Profile:
    draft_layer_ms: float  # t_d
    verify_layer_ms: float  # t_v
    expert_load_ms: float  # t_e
    num_layers: int  # L
    num_experts: int  # E
    top_k: int  # A
    num_slots: int  # S
    layer_recall: list[float] | None = None  # r_l per MoE layer; None: unknown (treated as 1)
    expert_bytes: int | None = None  # one expert's bytes
    bandwidth_gb_per_s: float | None = None  # measured pinned host->device bandwidth (the paced one when paced)
    copy_estimate_ms: float | None = None  # expert_bytes / bandwidth: what t_e is checked against
    copy_check: str | None = None  # one of COPY_CHECKS (None: profiles of older versions)


def expected_union(num_experts: int, top_k: int, k: int) -> float:
    return num_experts * (1 - (1 - top_k / num_experts) ** k)


def min_recall(copy_ms: float, landed_ms: float, verify_start_ms: float) -> float:
    """r_min(l) = o_l / (n t_e + o_l) for a layer whose copies take `copy_ms` = n t_e and land at C(l)."""
    overlap = min(copy_ms, max(0.0, landed_ms - verify_start_ms))  # o_l
    return overlap / (copy_ms + overlap) if overlap > 0 else 0.0


def cutoff_layer(p: Profile, k: int) -> int:
    """L* of the latency model above (-1 when not even layer 0 pays off)."""
    if p.layer_recall is not None and len(p.layer_recall) != p.num_layers:
        raise ValueError(f"profile layer_recall has {len(p.layer_recall)} entries for {p.num_layers} MoE layers")
    resident = min(1.0, p.num_slots / (p.num_layers * p.num_experts))
    n = expected_union(p.num_experts, p.top_k, k) * (1 - resident)
    copy_ms = n * p.expert_load_ms  # n t_e
    verify_start = k * p.num_layers * p.draft_layer_ms  # V(0)
    landed, best = 0.0, -1
    for layer in range(p.num_layers):
        landed = max(landed, (layer + 1) * p.draft_layer_ms) + copy_ms
        verify_at = verify_start + layer * p.verify_layer_ms
        if landed > verify_at or (layer + 1) * n > p.num_slots - p.top_k:
            break
        if p.layer_recall is not None:
            recall = p.layer_recall[layer]
            if recall <= 0 or recall < min_recall(copy_ms, landed, verify_start):
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

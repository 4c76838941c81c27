"""
GPU memory plan: how many expert slots a hardware profile's budget leaves.

    slots = floor((budget - non_expert - draft - kv - activations - reserve) / expert_bytes)

capped at the number of experts. `non_expert` is every target weight that is not a routed
expert (attention, norms, embeddings, routers, shared experts), `draft` the draft model (0
without SD), `kv` the KV caches at the longest sequence of the run, `activations` an upper
estimate of the largest forward's temporaries (logits are computed for the last positions
only), `reserve` the CUDA workspaces and allocator slack. A budget that cannot hold the
non-expert weights plus `top_k` experts (one token's experts at one layer, the least a forward
can run with) is rejected before anything is loaded, with the numbers. A method's cache gets
`capped_slots(slots, method.num_slots)`: the slots under the config's cap (None: no cap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from transformers import PretrainedConfig

from spmoe.models.experts import ExpertLayout


class BudgetError(ValueError):
    pass


@dataclass
class MemoryPlan:
    budget_bytes: int | None
    non_expert_bytes: int
    draft_bytes: int
    kv_bytes: int
    activation_bytes: int
    reserve_bytes: int
    expert_bytes: int
    num_experts_total: int
    num_slots: int

    def to_dict(self) -> dict:
        return asdict(self)


def kv_bytes(cfg: PretrainedConfig, max_seq_len: int, dtype_bytes: int) -> int:
    """K and V for every layer at `max_seq_len` positions."""
    heads = cfg.num_attention_heads
    if hasattr(cfg, "qk_rope_head_dim"):  # DeepSeek MLA caches full per-head K and V
        per_token = heads * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim)
    else:
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        per_token = 2 * getattr(cfg, "num_key_value_heads", heads) * head_dim
    return cfg.num_hidden_layers * per_token * max_seq_len * dtype_bytes


def activation_bytes(cfg: PretrainedConfig, layout: ExpertLayout, max_tokens: int, dtype_bytes: int) -> int:
    """Upper estimate of one forward's live temporaries at `max_tokens` tokens."""
    dense_i = max(getattr(cfg, "intermediate_size", 0) or 0, layout.intermediate_size)
    per_token = (16 * cfg.hidden_size + 4 * dense_i) * dtype_bytes + 4 * layout.top_k * cfg.hidden_size
    logits = 2 * 4 * cfg.vocab_size * 16  # fp32 logits of up to 16 positions, twice
    return max_tokens * per_token + logits


def plan_memory(
    layout: ExpertLayout,
    budget_bytes: int | None,
    non_expert_bytes: int,
    draft_bytes: int,
    kv: int,
    activations: int,
    reserve_bytes: int,
) -> MemoryPlan:
    total = len(layout.keys)
    if budget_bytes is None:
        num_slots = total
    else:
        free = budget_bytes - non_expert_bytes - draft_bytes - kv - activations - reserve_bytes
        num_slots = min(total, max(0, free // layout.expert_bytes))
        if num_slots < layout.top_k:
            raise BudgetError(
                f"GPU budget {_mib(budget_bytes)} is too small: non-expert weights {_mib(non_expert_bytes)}"
                f" + draft {_mib(draft_bytes)} + KV cache {_mib(kv)} + activations {_mib(activations)}"
                f" + reserve {_mib(reserve_bytes)} leave {_mib(max(free, 0))}, room for {num_slots} experts"
                f" of {_mib(layout.expert_bytes)}; at least top_k={layout.top_k} are needed"
                f" (needs a budget of at least {_mib(budget_bytes - free + layout.top_k * layout.expert_bytes, ceil=True)})"
            )
    return MemoryPlan(budget_bytes, non_expert_bytes, draft_bytes, kv, activations, reserve_bytes,
                      layout.expert_bytes, total, int(num_slots))


def capped_slots(num_slots: int, cap: int | None) -> int:
    """`num_slots` under `method.num_slots` (`cap`; None: every slot)."""
    return num_slots if cap is None else min(num_slots, cap)


def _mib(nbytes: int, ceil: bool = False) -> str:
    mib = nbytes / 2**20
    if ceil:
        mib = math.ceil(mib)
    return f"{mib:.0f} MiB ({mib / 1024:.3f} GiB)" if mib >= 1 else f"{nbytes} bytes"

"""
Re-implemented baselines (see `spmoe.strategy`); `spmoe.methods` imports them all and adds the
project's own (`spmoe`, `spmoe_plus`).

| name | what it is |
|---|---|
| gpu_resident | every expert resident on the device, no SD: the correctness reference and speed ceiling |
| gpu_resident_sd | every expert resident, with SD (same draft, same k) |
| lru_nosd | on-demand loading into a global LRU (or LFU, `method.eviction=lfu`) expert cache, no SD |
| lru | the same cache, with SD: verification loads the union of k+1 tokens' experts |
| mixtral_offloading_nosd | per-layer LRU expert cache (slots split evenly over MoE layers) + next-layer gate lookahead prefetch, no SD (Eliseev & Mazur 2023) |
| mixtral_offloading | the same, with SD: the lookahead runs inside the verify forward and prefetches the union over its k+1 positions |
| moe_infinity_nosd | per-sequence expert activation matrices matched against a collection of past ones, prefetch with decaying layer priority, frequency x layer-proximity eviction (Xue et al.), no SD |
| moe_infinity | the same, with SD (`method.trace_path` warms the collection from earlier runs' traces) |
| adapmoe_nosd | adaptive gating (drop the 2nd expert of low-sensitivity tokens; `method.adaptive_gating=false` keeps outputs exact) + adaptive multi-layer gate-lookahead prefetch + DP-sized per-layer caches (Zhong et al.), no SD |
| adapmoe | the same, with SD |
| accelerate | HF accelerate `device_map` offload under the same budget: the naive floor |
"""

from baselines import (  # noqa: F401
    accelerate_offload,
    adapmoe,
    gpu_resident,
    lru,
    mixtral_offloading,
    moe_infinity,
)

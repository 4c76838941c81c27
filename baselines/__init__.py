"""
Registered methods (see `spmoe.strategy`). Importing this package registers them all.

| name | what it is |
|---|---|
| gpu_resident | every expert resident on the device, no SD: the correctness reference and speed ceiling |
| lru_nosd | on-demand loading into a global LRU (or LFU, `method.eviction=lfu`) expert cache, no SD |
| accelerate | HF accelerate `device_map` offload under the same budget: the naive floor |
"""

from baselines import accelerate_offload, gpu_resident, lru  # noqa: F401

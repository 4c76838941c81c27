"""
Deterministic attention on CUDA: the cuDNN backend of `scaled_dot_product_attention` is excluded.

On Hopper (H100/H200) torch >= 2.11 prefers cuDNN's fused attention, and its forward is not bitwise
reproducible at decode shapes with an explicit mask: the same module on identical queries, keys and
values rounds differently from call to call (a GPU-resident run forced twice over the same tokens
differs at the attention block of single layers, by one bf16 ulp, which random-weight models amplify
into different greedy tokens). Flash and memory-efficient attention (and the math fallback) are
deterministic in the forward, so with cuDNN excluded a method and its reference agree wherever their
inputs do. The switch is process-wide (`torch.backends.cuda`), set once when a session opens on a
CUDA device.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def pin_deterministic_attention(device: torch.device) -> None:
    """On CUDA, disable cuDNN's SDPA backend (no-op on other devices)."""
    if device.type != "cuda":
        return
    if torch.backends.cuda.cudnn_sdp_enabled():
        log.info("scaled_dot_product_attention: cuDNN backend disabled (its forward is not reproducible);"
                 " flash / memory-efficient attention serve")
    torch.backends.cuda.enable_cudnn_sdp(False)

"""pin_deterministic_attention excludes cuDNN's SDPA backend on CUDA devices only, and a session opening on
the CPU leaves the process's backends as they were."""

import torch

from spmoe.runtime.attention_backend import pin_deterministic_attention


def test_cuda_device_disables_cudnn_sdpa():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        pin_deterministic_attention(torch.device("cpu"))
        assert torch.backends.cuda.cudnn_sdp_enabled()
        pin_deterministic_attention(torch.device("cuda", 0))
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)

"""PCIe pacing: the padding arithmetic, host-side pacing on CPU, config errors; on the GPU
(marked), achieved bandwidth at the emulated rate, one shared link for both copy streams, and
lossless outputs."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from spmoe.session import open_session
from spmoe.config import MethodConfig
from spmoe.offload.pacing import pad_ms
from spmoe.offload.transfer import TransferEngine


def test_pad_fills_the_copy_up_to_bytes_over_bandwidth():
    assert pad_ms(25_000_000, 0.45, 25.0) == pytest.approx(0.55)  # 25 MB at 25 GB/s = 1 ms
    assert pad_ms(25_000_000, 1.5, 25.0) == 0.0  # already slower than the emulated link
    assert pad_ms(0, 0.0, 25.0) == 0.0


def test_host_copies_take_at_least_bytes_over_the_paced_bandwidth():
    engine = TransferEngine(torch.device("cpu"), 1, pace_gb_per_s=0.01)  # 10 MB/s: 100 KB -> 10 ms
    src, dst = torch.ones(25_000), torch.zeros(25_000)  # 100 KB
    for _ in range(3):
        engine.load(0, dst, src)
    stats = engine.collect()
    assert stats.h2d_bytes == 300_000 and torch.equal(dst, src)
    assert stats.copy_ms >= 30.0 and stats.stall_ms == stats.copy_ms


def test_pacing_needs_a_bandwidth_and_keeps_outputs():
    cfg = tiny_run_config(num_prompts=1, max_new_tokens=6)
    s = open_session(cfg)
    try:
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, 6)
        hw = cfg.hardware
        hw.pace_pcie = True
        with pytest.raises(ValueError, match="needs hardware.pcie_gb_per_s"):
            s.generate(MethodConfig(name="lru_nosd", num_slots=4), hw, 6)
        hw.pcie_gb_per_s = 1.0
        gens, _, _ = s.generate(MethodConfig(name="lru_nosd", num_slots=4), hw, 6)
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
    finally:
        s.close()


@pytest.mark.gpu
def test_gpu_pacing_hits_the_emulated_bandwidth_on_one_shared_link(gpu):
    paced_gb_per_s, nbytes = 10.0, 64 << 20
    engine = TransferEngine(gpu, 4, pace_gb_per_s=paced_gb_per_s)
    src = torch.ones(nbytes // 2, dtype=torch.bfloat16).pin_memory()
    dst = [torch.empty_like(src, device=gpu) for _ in range(4)]
    engine.load(0, dst[0], src)  # warm-up
    torch.cuda.synchronize(gpu)
    engine.collect()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for slot in range(4):  # two on the demand stream, two on the prefetch stream: one link
        engine.load(slot, dst[slot], src, prefetch=slot % 2 == 1)
    torch.cuda.synchronize(gpu)
    end.record()
    end.synchronize()
    achieved = 4 * nbytes / (start.elapsed_time(end) * 1e6)
    assert 0.85 * paced_gb_per_s <= achieved <= 1.05 * paced_gb_per_s
    assert all(torch.equal(d.cpu(), src) for d in dst)

"""GPU: copy-stream ordering. With as few slots as one token needs, every load overwrites a slot
that a kernel read moments before; if the copy did not wait for the slot's free event, the
outputs would diverge from the all-resident reference."""

from __future__ import annotations

import pytest

from conftest import tiny_run_config
from spmoe.session import open_session
from spmoe.config import MethodConfig


@pytest.mark.gpu
@pytest.mark.parametrize("model", ["tiny", "tiny_qwen3_moe"])
def test_minimal_cache_on_gpu_is_lossless(gpu, model):
    cfg = tiny_run_config(model, num_prompts=2, max_new_tokens=24)
    cfg.hardware.device = "cuda"
    s = open_session(cfg)
    try:
        assert s.target.store.pinned
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, 24)
        top_k = s.target.layout.top_k
        for slots in (top_k, top_k + 1):
            gens, _, _ = s.generate(MethodConfig(name="lru_nosd", num_slots=slots), cfg.hardware, 24)
            assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
            decode = [r for g in gens for r in g.records if r.phase == "decode"]
            assert sum(r.h2d_bytes for r in decode) > 0
            assert sum(r.copy_ms for r in decode) > 0  # copy-stream timing events were harvested
    finally:
        s.close()

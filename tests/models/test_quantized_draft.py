"""The int8 self-draft (a quantized copy of the target): quantization error, size, acceptance."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from experiments.presets import load_preset
from experiments.runner import open_session
from spmoe.config import MethodConfig, SpecConfig
from spmoe.models.build import param_bytes
from spmoe.models.quantized_draft import dequant_workspace_bytes, quantize_rows, quantized_copy_bytes


def test_quantize_rows_error_is_half_a_step():
    w = torch.randn(16, 64)
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (16,)
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("model", ["tiny_deepseek_v2", "tiny"])
def test_self_draft_is_small_accepted_and_lossless(model):
    cfg = tiny_run_config(model, num_prompts=2, max_new_tokens=24)
    cfg.draft = load_preset("draft", "int8_self_fp32")
    s = open_session(cfg)
    try:
        target_bytes = s.target.non_expert_bytes + len(s.target.layout.keys) * s.target.layout.expert_bytes
        actual = param_bytes(s.draft)
        assert actual < 0.6 * target_bytes  # int8 weights of a float32 target (embeddings/norms stay float32)
        assert abs(quantized_copy_bytes(s.target) - actual) < 0.02 * actual  # the plan's estimate
        # the planned dequant workspace: the largest linear weight (the LM head here) in the compute dtype
        head = s.target.model.lm_head.weight
        assert dequant_workspace_bytes(s.target) == head.numel() * head.element_size()
        assert s.draft_bytes() >= actual + dequant_workspace_bytes(s.target)
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, 24)
        gens, _, _ = s.generate(MethodConfig(name="lru", num_slots=s.target.layout.top_k * 2), cfg.hardware, 24,
                                spec_cfg=SpecConfig(num_draft_tokens=3))
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref]
        recs = [r for g in gens for r in g.records if r.num_drafted]
        assert sum(r.num_accepted for r in recs) / sum(r.num_drafted for r in recs) > 0.8
    finally:
        s.close()

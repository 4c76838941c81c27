"""KV rollback: after a rejection, the next logits equal those of a fresh run on the accepted prefix."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_run_config
from transformers import DynamicCache

from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.config import MethodConfig
from spmoe.spec.drafter import ModelDrafter
from spmoe.spec.kv import cache_kwarg, crop_to
from spmoe.methods import get_strategy
from spmoe.strategy import MethodContext


@pytest.fixture(scope="module")
def session():
    cfg = tiny_run_config("tiny", num_prompts=1)
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    yield s
    s.close()


def _forward(model, ids, kv, num_logits=1):
    kw = cache_kwarg(model)
    return model(input_ids=torch.tensor([ids]), use_cache=True, logits_to_keep=num_logits, **{kw: kv}).logits[0]


@torch.inference_mode()
@pytest.mark.parametrize("num_accepted", [0, 2, 4])
def test_target_rollback_matches_fresh_prefix(session, num_accepted):
    ctx = MethodContext(session.cfg, session.target, session.device, session.plan(session.cfg.hardware, "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    try:
        model = runtime.model
        prompt = session.prompts[0].token_ids
        drafts = [7, 11, 13, 17]
        kv = DynamicCache(config=model.config)
        _forward(model, prompt[:-1], kv)
        _forward(model, [prompt[-1]] + drafts, kv, num_logits=5)  # verify 4 drafts
        crop_to(kv, len(prompt) + num_accepted)  # keep the last prompt token + accepted drafts
        assert kv.get_seq_length() == len(prompt) + num_accepted
        after = _forward(model, [99], kv)[-1]
        fresh = _forward(model, prompt + drafts[:num_accepted] + [99], DynamicCache(config=model.config))[-1]
        torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-5)
    finally:
        runtime.close()


@torch.inference_mode()
def test_drafter_rollback_matches_fresh_prefix(session):
    drafter = ModelDrafter(session.draft, session.device, temperature=0.0, top_p=1.0)
    prompt = session.prompts[0].token_ids
    drafter.begin(prompt)
    drafts, probs = drafter.propose(prompt + [5], 4, torch.Generator())
    assert probs is None and len(drafts) == 4
    assert drafter.num_cached == len(prompt) + 1 + 3  # the last draft is not fed
    drafter.rollback(len(prompt) + 2)  # one draft accepted
    seq = prompt + [5, drafts[0], 42]
    again, _ = drafter.propose(seq, 1, torch.Generator())
    fresh = _forward(session.draft, seq, DynamicCache(config=session.draft.config))[-1]
    assert again == [int(fresh.argmax())]


def test_crop_to_rejects_growing():
    kv = DynamicCache()
    kv.update(torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2), 0)
    with pytest.raises(ValueError, match="cannot crop"):
        crop_to(kv, 5)


def test_sampling_sd_is_seeded_and_runs_every_method(session):
    from spmoe.config import SpecConfig

    spec = SpecConfig(num_draft_tokens=3, temperature=0.8, top_p=0.95)
    runs = [session.generate(MethodConfig(name=m), session.cfg.hardware, 16, spec_cfg=spec)[0][0].token_ids
            for m in ("gpu_resident_sd", "gpu_resident_sd", "lru")]
    assert runs[0] == runs[1] == runs[2]  # same seed, same draws, whatever the offloading
    other = session.generate(MethodConfig(name="lru"), session.cfg.hardware, 16,
                             spec_cfg=SpecConfig(num_draft_tokens=3, temperature=0.8, top_p=0.95))
    assert len(other[0][0].token_ids) == 16

"""Static decode (hardware.decode=static): the static KV cache gives the dynamic cache's tokens.

The CUDA-graph path replays exactly `StaticDecoder.step`, so on the CPU these tests check everything
but the capture itself: rollback by moving the length pointer (stale positions never attended),
the step's mask and positions, and the engine and drafter wired through decoders."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_run_config
from tiny_families import tiny_hf_config

from experiments.presets import load_preset
from spmoe.config import HardwareConfig, MethodConfig, SpecConfig
from spmoe.methods import get_strategy
from spmoe.runtime.decoder import DynamicDecoder, StaticDecoder, make_decoder
from spmoe.runtime.graphs import capturable
from spmoe.runtime.static_cache import PositionedCache, causal_mask, sliding_window
from spmoe.session import open_session
from spmoe.strategy import MethodContext


@pytest.fixture(scope="module")
def session():
    cfg = tiny_run_config("tiny", weights="twin", num_prompts=2, max_new_tokens=16)
    cfg.model.twin.expert_noise = 0.5  # the pair accepts 18 of 31 drafts at k = 3, 5 steps in full
    cfg.draft = load_preset("draft", "tiny")
    s = open_session(cfg)
    yield s
    s.close()


def _tokens(session, method: str, decode: str, k: int = 3, num_slots: int | None = None):
    hw = replace(session.cfg.hardware, decode=decode)
    gens, _, _ = session.generate(MethodConfig(name=method, num_slots=num_slots), hw, 16,
                                  spec_cfg=SpecConfig(num_draft_tokens=k))
    return gens


@pytest.mark.parametrize("method,num_slots", [("gpu_resident", None), ("lru_nosd", 6), ("lru", 6),
                                              ("gpu_resident_sd", None)])
def test_static_cache_gives_the_dynamic_caches_tokens(session, method, num_slots):
    eager = _tokens(session, method, "eager", num_slots=num_slots)
    static = _tokens(session, method, "static", num_slots=num_slots)
    assert [g.token_ids for g in static] == [g.token_ids for g in eager]
    assert [[ev.needed for r in g.records for ev in r.layers] for g in static] == \
           [[ev.needed for r in g.records for ev in r.layers] for g in eager]
    if get_strategy(method).speculative:  # rejections (rollback) and full acceptances (the draft feeds 2) both occur
        steps = [r for g in static for r in g.records if r.num_drafted]
        assert any(r.num_accepted < r.num_drafted for r in steps)
        assert any(r.num_accepted == r.num_drafted for r in steps)
    if num_slots is not None:
        assert sum(len(ev.misses) for g in static for r in g.records for ev in r.layers) > num_slots  # it evicts


def test_every_step_shape_after_the_prompt_is_precaptured_before_timing(session, monkeypatch):
    """The target's and the draft's decoders precapture (at `Engine.reserve`, before any timed step) every
    (tokens, logits) shape they then feed after the prompt, the draft's two-token catch-up included, so no
    graph is captured inside a run's timed steps (CPU: the static decoder records what it would capture)."""
    precaptured, fed = set(), set()
    precapture, forward = StaticDecoder.precapture, StaticDecoder.forward

    def spy_precapture(self, shapes):
        precaptured.update((id(self), shape) for shape in shapes)
        return precapture(self, shapes)

    def spy_forward(self, ids, num_logits):
        if self.kv.length > 0:
            fed.add((id(self), (len(ids), num_logits)))
        return forward(self, ids, num_logits)

    monkeypatch.setattr(StaticDecoder, "precapture", spy_precapture)
    monkeypatch.setattr(StaticDecoder, "forward", spy_forward)
    gens = _tokens(session, "gpu_resident_sd", "static")
    assert any(r.num_accepted == r.num_drafted for g in gens for r in g.records if r.num_drafted)
    assert {shape for _, shape in fed} >= {(1, 1), (2, 1), (4, 4)}
    assert fed <= precaptured


@torch.inference_mode()
def test_rollback_leaves_no_stale_position_visible(session):
    """Verify 4 drafts, keep n, feed one token: the logits equal a fresh forward over the kept prefix,
    although the rejected drafts' keys are still in the static buffers."""
    ctx = MethodContext(session.cfg, session.target, session.device,
                        session.plan(session.cfg.hardware, "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    try:
        prompt, drafts = session.prompts[0].token_ids, [7, 11, 13, 17]
        static = StaticDecoder(runtime.model, session.device)
        for num_accepted in (0, 2, 4):
            static.begin(len(prompt) + 8)
            static.forward(prompt[:-1], 1)
            static.forward([prompt[-1]] + drafts, 5)
            static.crop(len(prompt) + num_accepted)
            after = static.forward([99], 1)[-1]
            fresh = DynamicDecoder(runtime.model, session.device)
            fresh.begin(0)
            want = fresh.forward(prompt + drafts[:num_accepted] + [99], 1)[-1]
            torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)
            assert static.length == len(prompt) + num_accepted + 1
    finally:
        runtime.close()


def test_causal_mask_admits_keys_up_to_each_query():
    positions = torch.tensor([3, 4])
    mask = causal_mask(positions, torch.arange(6), "sdpa", torch.float32)
    assert mask.shape == (1, 1, 2, 6)
    assert mask[0, 0].tolist() == [[True] * 4 + [False] * 2, [True] * 5 + [False]]
    additive = causal_mask(positions, torch.arange(6), "eager", torch.float32)[0, 0]
    assert (additive == 0).tolist() == mask[0, 0].tolist()
    assert bool((additive[~mask[0, 0]] == torch.finfo(torch.float32).min).all())


def test_cache_bounds(session):
    cache = PositionedCache(session.target.model.config, 8)
    cache.advance(5)
    with pytest.raises(ValueError, match="capacity"):
        cache.advance(4)
    with pytest.raises(ValueError, match="crop"):
        cache.crop(6)
    cache.crop(0)
    assert cache.get_seq_length() == 0


def test_sliding_window_shorter_than_the_cache_is_refused(session):
    cfg = session.draft.config.__class__(**{**session.draft.config.to_dict(), "sliding_window": 4})
    with pytest.raises(ValueError, match="sliding window"):
        PositionedCache(cfg, 8)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
def test_a_window_no_layer_applies_is_not_refused(family):
    """Qwen2-MoE carries a `sliding_window` that `use_sliding_window=False` / `layer_types` switch off."""
    text = tiny_hf_config(family, num_layers=2, num_experts=4, max_position_embeddings=64)
    text.sliding_window = 4
    text.layer_types = ["full_attention"] * 2
    assert PositionedCache(text, 8).capacity == 8
    text.layer_types = ["full_attention", "sliding_attention"]
    with pytest.raises(ValueError, match="sliding window of 4"):
        PositionedCache(text, 8)
    assert sliding_window(SimpleNamespace(sliding_window=4, use_sliding_window=False)) is None
    assert sliding_window(SimpleNamespace(sliding_window=4)) == 4


def test_graphs_fall_back_to_static_off_cuda(session):
    """On the CPU `graphs` decodes eagerly over the static cache (nothing is captured)."""
    decoder = make_decoder(session.draft, torch.device("cpu"), "graphs", max_graph_tokens=2)
    assert isinstance(decoder, StaticDecoder) and not capturable(session.draft, torch.device("cpu"))
    gens = _tokens(session, "gpu_resident_sd", "graphs")
    assert [g.token_ids for g in gens] == [g.token_ids for g in _tokens(session, "gpu_resident_sd", "eager")]


def test_decode_mode_is_validated():
    with pytest.raises(ValueError, match="hardware.decode"):
        HardwareConfig(decode="compiled")
    with pytest.raises(ValueError, match="decode mode"):
        make_decoder(None, torch.device("cpu"), "compiled")


def test_capturable_needs_hookless_sync_free_forward(gpu):
    """On CUDA: a gpu_resident target is capturable; a forward hook anywhere makes it not."""
    cfg = tiny_run_config("tiny", hardware=load_preset("hardware", "h200"), num_prompts=1)
    cfg.model.dtype = "bfloat16"
    s = open_session(cfg)
    try:
        ctx = MethodContext(s.cfg, s.target, s.device, s.plan(s.cfg.hardware, "gpu_resident"))
        runtime = get_strategy("gpu_resident").build(ctx)
        try:
            assert capturable(runtime.model, s.device)
            handle = runtime.model.model.layers[0].register_forward_hook(lambda *a: None)
            assert not capturable(runtime.model, s.device)
            handle.remove()
        finally:
            runtime.close()
    finally:
        s.close()


def test_graph_replay_gives_the_static_decoders_tokens(gpu):
    """On CUDA (bf16 tiny twin): target and draft steps are replayed from graphs, and the tokens and
    expert events equal the static decoder's, which runs the same step eagerly."""
    cfg = tiny_run_config("tiny", weights="twin", hardware=load_preset("hardware", "h200"), num_prompts=2)
    cfg.model.dtype = "bfloat16"
    cfg.model.twin.expert_noise = 0.5
    cfg.draft = load_preset("draft", "tiny", dtype="bfloat16")
    s = open_session(cfg)
    try:
        for method in ("gpu_resident", "gpu_resident_sd"):
            static, graphs = _tokens(s, method, "static"), _tokens(s, method, "graphs")
            assert [g.token_ids for g in graphs] == [g.token_ids for g in static]
            assert [[ev.needed for r in g.records for ev in r.layers] for g in graphs] == \
                   [[ev.needed for r in g.records for ev in r.layers] for g in static]
    finally:
        s.close()


@pytest.mark.parametrize("draft", ["int8_self", "int4_self"])
def test_quantized_self_draft_is_captured_whole_and_drafts_as_its_static_decoder(gpu, draft):
    """On CUDA (bf16 tiny DeepSeek-V2, a quantized self-draft): the draft's forward is capturable whole, its
    experts computed on the device without a host sync, and SD under graphs accepts the same drafts and emits
    the same tokens as under the static decoder, which runs the same draft step eagerly."""
    cfg = tiny_run_config("tiny_deepseek_v2", hardware=load_preset("hardware", "h200"), num_prompts=2)
    cfg.model.dtype = "bfloat16"
    cfg.draft = load_preset("draft", draft)
    s = open_session(cfg)
    try:
        assert capturable(s.draft, s.device)
        static, graphs = _tokens(s, "gpu_resident_sd", "static"), _tokens(s, "gpu_resident_sd", "graphs")
        assert [g.token_ids for g in graphs] == [g.token_ids for g in static]
        assert [[r.num_accepted for r in g.records] for g in graphs] == \
               [[r.num_accepted for r in g.records] for g in static]
    finally:
        s.close()


def test_lossless_reference_mirrors_a_static_run(session):
    """A static run records its cache's capacity; the check's reference decodes over a static cache of
    that capacity, and the run is exact against it (CPU float32)."""
    from spmoe.trace.lossless import check_lossless

    for method in ("gpu_resident", "gpu_resident_sd"):
        gens = _tokens(session, method, "static")
        assert all(g.decode == "static" and g.kv_capacity and g.kv_capacity % 64 == 0 for g in gens)
        check = check_lossless(session, gens, temperature=0.0)
        assert check.lossless and check.token_agreement == 1.0
    assert _tokens(session, "gpu_resident", "eager")[0].kv_capacity is None

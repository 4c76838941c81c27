"""spmoe_plus's draft choice (`spmoe.plus.draft_choice`): the rule on hand-made inputs, and runs that
decline the draft (`method.plus.draft_precision=none`, or `auto` picking none) on tiny twins (CPU float32):
lossless against gpu_resident, no draft used or planned, the draft's bytes as expert slots, one
session shared with cases that draft."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import open_with_reference, tiny_run_config, tiny_twin_config

from experiments.presets import load_preset
from spmoe.config import CutoffConfig, HardwareConfig, MethodConfig, PlusConfig, SpecConfig
from spmoe.experiment import Case, run_cases
from spmoe.offload.budget import BudgetError
from spmoe.plus import draft_choice
from spmoe.plus.draft_choice import (
    DraftChoice,
    DraftOption,
    ModelShape,
    choose,
    inputs,
    link_gb_per_s,
    predict_tpot_ms,
    trace_acceptance,
    union_size,
)
from spmoe.plus.draft_precision import estimate_precision, quantize_draft
from spmoe.session import open_session
from spmoe.trace.metrics import summarize

GB = 10**9
MIXTRAL_EXPERT = 3 * 4096 * 14336 * 2
DEEPSEEK_EXPERT = 3 * 2048 * 1408 * 2


def _mixtral(k: int, acceptance: float) -> ModelShape:
    return ModelShape(num_moe_layers=32, num_target_host_layers=32, num_experts=8, top_k=2, expert_bytes=MIXTRAL_EXPERT,
                      non_expert_bytes=int(1.6 * GB), num_draft_tokens=k, acceptance=acceptance,
                      link_gb_per_s=25.0, device_gb_per_s=2000.0, layer_ms=0.5)


def _mixtral_options(slots: tuple[int, int, int, int]) -> list[DraftOption]:
    """A bf16 Mistral-7B-shaped draft (14.5 GB, 14.1 GB of linear sites); int8 / int4 read their
    quantized sites and the dequantized transients besides."""
    none, bf16, int8, int4 = slots
    return [DraftOption("none", none), DraftOption("bf16", bf16, int(14.5 * GB)),
            DraftOption("int8", int8, int((14.5 + 14.1 + 7.2) * GB)),
            DraftOption("int4", int4, int((14.5 + 14.1 + 3.9) * GB))]


def test_deepseek_like_setting_picks_no_draft():
    """DeepSeek-V2-Lite at 24 GiB: an int8 self-copy of the target as the draft leaves 348 slots of
    1664 against 1298 without it; 64 experts of a layer, top-6, k = 1."""
    shape = ModelShape(num_moe_layers=26, num_target_host_layers=26, num_experts=64, top_k=6, expert_bytes=DEEPSEEK_EXPERT,
                       non_expert_bytes=int(2.7 * GB), num_draft_tokens=1, acceptance=0.875,
                       link_gb_per_s=25.0, device_gb_per_s=2000.0, layer_ms=0.5)
    active = shape.non_expert_bytes + 26 * 6 * DEEPSEEK_EXPERT
    choice, ms = choose(shape, [DraftOption("none", 1298), DraftOption("as_configured", 348, int(2.5 * active), 26)])
    assert choice == "none" and ms["as_configured"] > 2 * ms["none"]


def test_mixtral_like_setting_picks_a_quantized_draft():
    """Mixtral at 24 GiB (62 slots without the draft, 21 beside bf16, +20 / +26 with int8 / int4), k = 3,
    acceptance 0.9: the union of 4 tokens is cheaper per emitted token, and the smaller draft leaves more slots."""
    choice, ms = choose(_mixtral(3, 0.9), _mixtral_options((62, 21, 41, 47)))
    assert choice in ("int8", "int4") and ms[choice] < ms["bf16"] < ms["none"]
    choice, ms = choose(_mixtral(1, 0.5), _mixtral_options((62, 21, 41, 47)))  # poor acceptance: SD does not pay
    assert choice == "none"


def test_model_terms():
    assert union_size(8, 2, 1) == pytest.approx(2) and union_size(64, 6, 1) == pytest.approx(6)
    assert union_size(8, 2, 4) == pytest.approx(8 * (1 - 0.75 ** 4))
    shape = replace(_mixtral(2, 1.0), layer_ms=0.0, non_expert_bytes=0)
    all_resident = predict_tpot_ms(shape, DraftOption("none", 256))
    assert all_resident == pytest.approx(32 * 2 * MIXTRAL_EXPERT / 2e9)  # the experts read once, nothing missing
    half = predict_tpot_ms(shape, DraftOption("none", 128))
    assert half == pytest.approx(all_resident + 32 * 2 * 0.5 * MIXTRAL_EXPERT / 25e9 * 1e3)
    # with a draft: 3 tokens emitted per step (acceptance 1), the draft's time hides as much link time
    sd = predict_tpot_ms(shape, DraftOption("bf16", 128, int(14.5 * GB)))
    u = union_size(8, 2, 3)
    draft_ms = 2 * 14.5 * GB / 2e9
    miss_ms = 32 * u * 0.5 * MIXTRAL_EXPERT / 25e6
    assert sd == pytest.approx((draft_ms + 32 * u * MIXTRAL_EXPERT / 2e9 + miss_ms - draft_ms) / 3)


def test_trace_acceptance_counts_rejections_once_per_step():
    trace = SimpleNamespace(row_drafted=np.array([0, 3, 3, 3, 0]), row_accepted=np.array([-1, 3, 1, 0, -1]))
    assert trace_acceptance(trace) == pytest.approx(4 / (4 + 2))
    assert trace_acceptance(None) is None
    assert trace_acceptance(SimpleNamespace(row_drafted=np.array([0]), row_accepted=np.array([-1]))) is None


def test_invalid_precision_lists_the_valid_ones():
    with pytest.raises(ValueError, match="valid: none, bf16, int8, int4, auto"):
        PlusConfig(draft_precision="fp8")
    with pytest.raises(ValueError, match="choice_link_gb_per_s"):
        PlusConfig(choice_link_gb_per_s=0)


@pytest.fixture(scope="module")
def twin():
    s = open_with_reference(tiny_twin_config(max_new_tokens=16), 16)
    yield s
    s.close()


def _method(precision: str, num_slots: int | None = None, **plus) -> MethodConfig:
    return MethodConfig(name="spmoe_plus", num_slots=num_slots, eviction="sd_lookahead",
                        cutoff=CutoffConfig(mode="fixed", layer=1), plus=PlusConfig(draft_precision=precision, **plus))


def _budget_for_slots(s, num_slots: int):
    """CPU hardware with a budget that leaves `num_slots` expert slots beside the bf16 draft."""
    hw = replace(s.cfg.hardware, reserve_mib=0.0)
    plan = s.plan(hw, "spmoe_plus", _method("bf16"))
    fixed = plan.non_expert_bytes + plan.draft_bytes + plan.kv_bytes + plan.activation_bytes
    return replace(hw, gpu_budget_gib=(fixed + num_slots * plan.expert_bytes + 1) / 2**30)


def test_estimated_quantized_bytes_match_the_quantized_draft(twin):
    for precision in ("int8", "int4"):
        est = estimate_precision(twin.draft, precision, group_size=16)
        applied = quantize_draft(twin.draft, precision, group_size=16)
        try:
            assert (est.site_bytes, est.quantized_bytes, est.workspace_bytes) == (
                applied.site_bytes, applied.quantized_bytes, applied.workspace_bytes)
        finally:
            applied.restore()


def test_host_layers_follow_the_decode_mode(twin):
    """Under eager every layer pays the per-layer host time; under graphs only the target's MoE layers."""
    num_layers = twin.target.model.config.num_hidden_layers
    for decode, target_layers, draft_layers in (("eager", num_layers, twin.draft.config.num_hidden_layers),
                                                ("graphs", len(twin.target.layout.moe_layers), 0)):
        offer = twin.draft_offer(replace(twin.cfg.hardware, decode=decode), _method("auto"))
        shape, options, source = inputs(offer)
        assert shape.num_target_host_layers == target_layers and source == "accept_prior"
        assert [o.name for o in options] == ["none", "bf16", "int8", "int4"]
        assert all(o.num_draft_host_layers == draft_layers for o in options[1:])


def test_no_draft_run_is_lossless_plans_no_draft_and_gets_more_slots(twin):
    hw = _budget_for_slots(twin, 6)
    calls = {}
    original = twin.draft.forward
    try:
        for precision in ("bf16", "none"):
            twin.draft.forward = lambda *a, p=precision, **kw: calls.setdefault(p, []).append(1) or original(*a, **kw)
            runs = calls, twin.generate(_method(precision), hw, 16, spec_cfg=SpecConfig(num_draft_tokens=2))
            calls[precision + "_run"] = runs[1]
    finally:
        del twin.draft.forward
    (gens_sd, plan_sd, _), (gens, plan, _) = calls["bf16_run"], calls["none_run"]
    assert plan_sd.num_slots == 6 and plan_sd.draft_bytes > 0 and calls.get("bf16")
    assert [g.token_ids for g in gens] == twin.reference == [g.token_ids for g in gens_sd]
    assert "none" not in calls and plan.draft_bytes == 0 and plan.num_slots > plan_sd.num_slots
    metrics = summarize([g.records for g in gens])
    assert metrics["acceptance_rate"] is None
    assert all(not r.num_drafted for g in gens for r in g.records)
    extra = twin.last_extra
    assert extra["draft_choice"] == extra["draft_precision"] == "none" and extra["draft"] is None
    assert extra["extra_slots"] == plan.num_slots - 6 > 0
    assert set(extra["draft_choice_predicted_ms"]) == {"none", "bf16", "int8", "int4"}
    assert extra["draft_choice_slots"]["none"] == plan.num_slots and extra["draft_choice_slots"]["bf16"] == 6


def test_a_draft_that_does_not_fit_the_budget_falls_back_to_no_draft(twin):
    """A budget that holds the target's non-expert weights and top_k experts but not the draft beside them: a
    fixed precision decodes without a draft and says why; a method without the fallback refuses the budget."""
    hw = _budget_for_slots(twin, 6)
    plan_sd = twin.plan(hw, "spmoe_plus", _method("bf16"))
    small = replace(hw, gpu_budget_gib=hw.gpu_budget_gib - (plan_sd.draft_bytes + 4 * plan_sd.expert_bytes) / 2**30)
    with pytest.raises(BudgetError, match="too small"):
        twin.plan(small, "spmoe", replace(_method("bf16"), name="spmoe"))
    gens, plan, _ = twin.generate(_method("int8", host_compute="off"), small, 16, spec_cfg=SpecConfig(num_draft_tokens=2))
    extra = twin.last_extra
    assert plan.draft_bytes == 0 and plan.num_slots >= twin.target.layout.top_k
    assert extra["draft_choice"] == extra["draft_precision"] == "none"
    assert "does not fit" in extra["draft_choice_fallback"] and "draft_precision=int8" in extra["draft_choice_fallback"]
    assert all(not r.num_drafted for g in gens for r in g.records)
    assert [g.token_ids for g in gens] == twin.reference
    twin.generate(_method("int8", host_compute="off"), hw, 4, spec_cfg=SpecConfig(num_draft_tokens=2))
    assert twin.last_extra["draft_choice_fallback"] is None and twin.last_extra["draft_choice"] == "int8"


def test_auto_follows_the_model_and_a_quantized_pick_is_calibrated(twin):
    # no draft token accepted: a step emits one token for a wider union and the draft's time, so auto declines
    # host compute off: its split follows measured host time, which machine load moves; the choice is the subject
    declining = _method("auto", num_slots=10, accept_prior=0.0, host_compute="off")
    gens, plan, _ = twin.generate(declining, twin.cfg.hardware, 16, spec_cfg=SpecConfig(num_draft_tokens=2))
    assert twin.last_extra["draft_choice"] == "none" and plan.draft_bytes == 0
    assert [g.token_ids for g in gens] == twin.reference
    # a slow link, certain acceptance: 3 tokens per step for the price of their union, so it drafts, and
    # under a budget the quantized drafts' saved bytes are slots: the model ranks them first, calibration checks
    slow = {"choice_link_gb_per_s": 1e-3, "choice_layer_ms": 0.0, "accept_prior": 1.0, "host_compute": "off"}
    gens, plan, _ = twin.generate(_method("auto", **slow), _budget_for_slots(twin, 6), 16,
                                  spec_cfg=SpecConfig(num_draft_tokens=2))
    extra = twin.last_extra
    assert extra["draft_choice"] in ("int8", "int4") and plan.draft_bytes > 0
    predicted = extra["draft_choice_predicted_ms"]
    assert predicted[extra["draft_choice"]] == min(predicted.values())
    assert extra["draft_agreement_tried"] and extra["draft_agreement_tried"].keys() <= {"int8", "int4"}
    assert extra["draft_precision"] == "bf16" or extra["draft_agreement"] >= 0.95
    assert [g.token_ids for g in gens] == twin.reference


def test_under_replay_auto_applies_the_pick_without_calibration(twin, monkeypatch):
    import spmoe.methods.spmoe_plus as plus

    monkeypatch.setattr(plus, "choose_precision", lambda *a, **kw: pytest.fail("calibrated under replay"))
    ctx = SimpleNamespace(cfg=replace(twin.cfg, method=_method("auto")), draft=twin.draft, routing_trace=object())
    choice = DraftChoice("int4", {"none": 2.0, "bf16": 1.5, "int8": 1.2, "int4": 1.0}, {}, 1.0, "trace", 25.0)
    applied = plus._apply_draft_precision(ctx, choice)
    try:
        assert applied.precision == "int4" and applied.quantized and applied.agreement is None
    finally:
        applied.restore()


def test_a_declining_case_shares_a_session_with_drafting_cases(tmp_path):
    cfg = tiny_run_config("tiny", num_prompts=1, max_new_tokens=8)
    cfg.model.weights = "twin"
    cfg.draft = load_preset("draft", "tiny")
    methods = {"plus_nosd": _method("none", num_slots=10), "plus_int8": _method("int8", num_slots=10),
               "plus_nosd_nohost": _method("none", num_slots=4, host_compute="off"),
               "lru_nosd": MethodConfig(name="lru_nosd", num_slots=4), "spmoe": replace(_method("bf16", 10), name="spmoe")}
    cases = [Case(name, replace(cfg, method=m, spec=SpecConfig(num_draft_tokens=2)), tmp_path / name)
             for name, m in methods.items()]
    summaries = dict(zip(methods, run_cases(cases, rounds=2, warmup_tokens=0, experiment="x")))
    assert all("error" not in s for s in summaries.values()), summaries
    tokens = {name: s["lossless"] for name, s in summaries.items()}
    assert all(tokens.values()), tokens
    assert summaries["plus_nosd"]["draft_choice"] == "none" and summaries["plus_nosd"]["num_draft_tokens"] is None
    assert summaries["plus_nosd"]["acceptance_rate"] is None
    assert summaries["plus_int8"]["draft_precision"] == "int8" and summaries["plus_int8"]["acceptance_rate"] is not None
    # without a draft the eviction is method.plus.nosd_eviction (lru): on demand, as lru_nosd, hit for hit
    assert summaries["plus_nosd"]["eviction"] == "lru" and summaries["plus_int8"]["eviction"] == "sd_lookahead"
    nohost, lru = summaries["plus_nosd_nohost"], summaries["lru_nosd"]
    assert (nohost["expert_hits"], nohost["expert_misses"]) == (lru["expert_hits"], lru["expert_misses"])
    assert nohost["expert_misses"] > 4  # it evicts


def test_no_draft_without_a_session_draft(tmp_path):
    cfg = tiny_run_config("tiny", num_prompts=1, max_new_tokens=8)
    s = open_session(replace(cfg, method=_method("none", num_slots=10)))
    try:
        ref, _, _ = s.generate(MethodConfig(name="gpu_resident"), cfg.hardware, 8)
        gens, plan, _ = s.generate(_method("none", num_slots=10), cfg.hardware, 8)
        assert [g.token_ids for g in gens] == [g.token_ids for g in ref] and plan.draft_bytes == 0
        assert set(s.last_extra["draft_choice_predicted_ms"]) == {"none"}
        with pytest.raises(ValueError, match="needs a draft model"):
            s.generate(_method("int8", num_slots=10), cfg.hardware, 8)
    finally:
        s.close()


def test_the_choice_prices_misses_at_the_link_the_run_copies_over(monkeypatch):
    """Paced: the card's link (the measured one if slower); unpaced on CUDA: the measured pinned bandwidth,
    not the emulated card's; on the CPU: the card's link, else the configured default."""
    from spmoe.plus import draft_choice

    monkeypatch.setattr(draft_choice.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(draft_choice, "pinned_gb_per_s", lambda device: 55.5)

    def cfg(**hw):
        return SimpleNamespace(hardware=HardwareConfig(**hw), method=MethodConfig(name="spmoe_plus",
                                                                                  plus=PlusConfig(choice_link_gb_per_s=7.0)))

    assert link_gb_per_s(cfg(device="cuda", pcie_gb_per_s=25.0, pace_pcie=True)) == 25.0
    assert link_gb_per_s(cfg(device="cuda", pcie_gb_per_s=64.0, pace_pcie=True)) == 55.5  # pacing never speeds up
    assert link_gb_per_s(cfg(device="cuda", pcie_gb_per_s=25.0, pace_pcie=False)) == 55.5
    assert link_gb_per_s(cfg(device="cuda")) == 55.5
    assert link_gb_per_s(cfg(device="cpu", pcie_gb_per_s=25.0)) == 25.0
    assert link_gb_per_s(cfg(device="cpu")) == 7.0


@pytest.mark.parametrize("kernel", [True, False])
def test_quantized_draft_reads_its_sites_once_where_the_kernel_serves(twin, kernel, monkeypatch):
    """A quantized draft's bytes per token: its unquantized weights and its quantized sites where
    `quant_gemv` serves the run's device; else twice its sites' full-precision bytes besides (the workspace
    each site dequantizes into, written then read)."""
    monkeypatch.setattr(draft_choice.quant_gemv, "serves", lambda device, k: kernel)
    offer = twin.draft_offer(twin.cfg.hardware, _method("auto"))
    _, options, _ = inputs(offer)
    read = {o.name: o.draft_read_bytes for o in options}
    for precision in ("int8", "int4"):
        est = estimate_precision(twin.draft, precision, group_size=PlusConfig().draft_group_size)
        dequantized = 0 if kernel else 2 * est.site_bytes
        expected = offer.draft_weight_bytes - est.site_bytes + est.quantized_bytes + dequantized
        assert read[precision] == expected
        assert (read[precision] < read["bf16"]) == kernel

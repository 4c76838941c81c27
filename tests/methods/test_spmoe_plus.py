"""spmoe_plus on tiny twins (CPU float32): each part alone and all together are lossless against
gpu_resident, and each part does what it claims (slots from the quantized draft, experts on the host,
chosen k in the trace)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import open_with_reference, tiny_twin_config

from spmoe.config import CutoffConfig, MethodConfig, PlusConfig, SpecConfig
from spmoe.plus.draft_precision import quantize_draft
from spmoe.trace.metrics import summarize

OFF = dict(draft_precision="bf16", host_compute="off", adaptive_k=False)
PARTS = {
    "int8_draft": dict(OFF, draft_precision="int8"),
    "int4_draft": dict(OFF, draft_precision="int4"),
    # a slow link and certain acceptance: the draft choice's model drafts (see test_spmoe_plus_choice)
    "auto_draft": dict(OFF, draft_precision="auto", choice_link_gb_per_s=1e-3, choice_layer_ms=0.0, accept_prior=1.0),
    "host_all": dict(OFF, host_compute="all"),
    "host_all_fill": dict(OFF, host_compute="all", host_fill=True),
    "host_auto": dict(OFF, host_compute="auto"),
    "host_reuse": dict(OFF, host_compute="auto", host_reuse=True),
    "adaptive_k": dict(OFF, adaptive_k=True),
    "sd_lookahead": dict(OFF),
    "all": dict(adaptive_k=True),
}


@pytest.fixture(scope="module")
def twin():
    s = open_with_reference(tiny_twin_config(max_new_tokens=20), 20)
    yield s
    s.close()


def _plus(s, part: str, k: int = 2, num_slots: int | None = 10, hardware=None):
    eviction = "sd_lookahead" if part in ("sd_lookahead", "all") else "layer_distance"
    method = MethodConfig(name="spmoe_plus", num_slots=num_slots, eviction=eviction,
                          cutoff=CutoffConfig(mode="fixed", layer=1), plus=PlusConfig(**PARTS[part]))
    gens, plan, _ = s.generate(method, hardware or s.cfg.hardware, 20, spec_cfg=SpecConfig(num_draft_tokens=k))
    return gens, plan, summarize([g.records for g in gens])


def _budget_for_slots(s, num_slots: int):
    """CPU hardware with a budget that leaves `num_slots` expert slots beside the bf16 draft."""
    hw = replace(s.cfg.hardware, reserve_mib=0.0)
    plan = s.plan(hw, "spmoe_plus")
    fixed = plan.non_expert_bytes + plan.draft_bytes + plan.kv_bytes + plan.activation_bytes
    return replace(hw, gpu_budget_gib=(fixed + num_slots * plan.expert_bytes + 1) / 2**30)


@pytest.mark.parametrize("part", list(PARTS))
def test_each_part_alone_is_lossless(twin, part):
    gens, _, summary = _plus(twin, part)
    assert [g.token_ids for g in gens] == twin.reference
    extra = twin.last_extra
    if part != "adaptive_k" and part != "all":
        assert summary["acceptance_rate"] >= 0.5
    if part in ("int8_draft", "int4_draft"):
        assert extra["draft_precision"] == part[:4] and extra["draft_saved_bytes"] > 0
    if part == "auto_draft":
        assert extra["draft_precision"] in ("int4", "int8", "bf16") and extra["draft_choice"] != "none"
        assert extra["draft_precision"] == "bf16" or extra["draft_agreement"] >= 0.95
    if part == "host_all":
        assert extra["host_experts"] > 0 and extra["host_cost_copy_ms"] is None
    if part in ("adaptive_k", "all"):
        drafted = [r.num_drafted for g in gens for r in g.records if r.phase == "decode" and r.num_drafted is not None]
        assert drafted and all(0 <= k <= 2 for k in drafted)
        assert sum(extra["chosen_k_counts"].values()) >= len(drafted)
    else:
        assert "chosen_k_counts" not in extra


def test_host_fill_loads_host_experts_into_free_slots_only(twin):
    """With fill, a host-computed expert that finds a free slot is also loaded (never evicting), so later
    uses hit on the device instead of going back to the host; tokens stay the reference's."""
    _, _, cold = _plus(twin, "host_all", num_slots=12)
    cold_extra = dict(twin.last_extra)
    gens, _, warm = _plus(twin, "host_all_fill", num_slots=12)
    extra = twin.last_extra
    assert cold_extra["host_filled"] == 0 and 0 < extra["host_filled"] <= 12
    assert [g.token_ids for g in gens] == twin.reference
    assert extra["host_experts"] < cold_extra["host_experts"] and warm["expert_hits"] > cold["expert_hits"]
    gens, _, _ = _plus(twin, "host_all_fill", num_slots=4)  # a full cache: fills never evict
    assert twin.last_extra["host_filled"] <= 4 and [g.token_ids for g in gens] == twin.reference


def test_draft_comes_back_and_other_methods_are_unaffected(twin):
    before = {n: p.clone() for n, p in twin.draft.named_parameters()}
    _plus(twin, "all")
    assert {n: p for n, p in twin.draft.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in twin.draft.named_parameters())
    method = MethodConfig(name="spmoe", num_slots=10, cutoff=CutoffConfig(mode="fixed", layer=1))
    gens, _, _ = twin.generate(method, twin.cfg.hardware, 20, spec_cfg=SpecConfig(num_draft_tokens=2))
    assert [g.token_ids for g in gens] == twin.reference


def test_saved_draft_bytes_become_slots(twin):
    hw = _budget_for_slots(twin, 6)
    _, plan_bf16, _ = _plus(twin, "sd_lookahead", num_slots=None, hardware=hw)
    assert plan_bf16.num_slots == 6 and twin.last_extra["extra_slots"] == 0
    _, plan_int8, _ = _plus(twin, "int8_draft", num_slots=None, hardware=hw)
    gained = twin.last_extra["draft_saved_bytes"] // plan_int8.expert_bytes
    assert gained > 0
    assert twin.last_extra["extra_slots"] == plan_int8.num_slots - 6 == min(gained, plan_int8.num_experts_total - 6)


def test_quantized_draft_accounting_and_restore(twin):
    draft = twin.draft
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    full = draft(input_ids=ids).logits
    sizes = {}
    for precision in ("int8", "int4"):
        applied = quantize_draft(draft, precision, group_size=16)
        sizes[precision] = applied.quantized_bytes
        assert not any(isinstance(m, torch.nn.Linear) for m in draft.model.layers.modules())
        assert applied.saved_bytes == applied.site_bytes - applied.quantized_bytes - applied.workspace_bytes > 0
        with applied.full_precision():
            assert torch.equal(draft(input_ids=ids).logits, full)
        assert not torch.equal(draft(input_ids=ids).logits, full)
        applied.restore()
        assert torch.equal(draft(input_ids=ids).logits, full)
    assert sizes["int4"] < sizes["int8"] < 0.27 * applied.site_bytes  # float32 sites: int8 ~1/4 + a scale per row


def test_a_failing_build_closes_its_runtime(twin, monkeypatch):
    """A part that fails after the SP-MoE runtime is built (here the host cost measurement) must not
    leave the draft quantized, the prefetch worker running or hooks on the models."""
    import threading

    import spmoe.methods.spmoe_plus as plus
    from spmoe.plus.draft_precision import QuantLinear

    def boom(*args, **kwargs):
        raise RuntimeError("host cost measurement failed")

    threads = threading.active_count()
    monkeypatch.setattr(plus, "measure_host_cost", boom)
    with pytest.raises(RuntimeError, match="host cost measurement failed"):
        _plus(twin, "all")
    assert not any(isinstance(m, QuantLinear) for m in twin.draft.modules())
    assert threading.active_count() == threads
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in twin.draft.modules())
    monkeypatch.undo()
    gens, _, _ = _plus(twin, "int8_draft")
    assert [g.token_ids for g in gens] == twin.reference


def test_device_served_experts_round_like_every_other_method(twin, monkeypatch):
    """The experts the host-assisted layer serves from the device cache go through the same kernel as
    `OffloadedExperts` (the one-group grouped GEMM where supported), so bf16 GPU runs round like the
    reference; plain `expert_mlp` is left to the host's own experts."""
    import spmoe.plus.host_experts as host_experts

    def plain(*args, **kwargs):
        raise AssertionError("a device-served expert bypassed the grouped kernel")

    monkeypatch.setattr(host_experts, "expert_mlp", plain)
    gens, _, _ = _plus(twin, "adaptive_k")  # host compute off: every expert is device-served
    assert [g.token_ids for g in gens] == twin.reference


def test_a_failing_quantization_or_calibration_restores_the_draft(twin, monkeypatch):
    import spmoe.plus.draft_precision as dp

    def fails(*args, **kwargs):
        raise RuntimeError("calibration failed")

    monkeypatch.setattr(dp, "agreement", fails)
    with pytest.raises(RuntimeError, match="calibration failed"):
        dp.choose_precision(twin.draft, 0.9, 16, torch.tensor([[5, 9, 14]]), num_tokens=2)
    assert not any(isinstance(m, dp.QuantLinear) for m in twin.draft.modules())
    calls = []

    def third_fails(linear, bits, group_size, workspace):
        calls.append(linear)
        if len(calls) == 3:
            raise RuntimeError("quantization failed")
        return original(linear, bits, group_size, workspace)

    original = dp.QuantLinear
    monkeypatch.setattr(dp, "QuantLinear", third_fails)
    with pytest.raises(RuntimeError, match="quantization failed"):
        dp.quantize_draft(twin.draft, "int8", 16)
    assert not any(isinstance(m, original) for m in twin.draft.modules())


def _lossy(s, lossy: str, hardware=None, num_slots: int | None = 10, cutoff: int = 1):
    method = MethodConfig(name="spmoe_plus", num_slots=num_slots, eviction="layer_distance",
                          cutoff=CutoffConfig(mode="fixed", layer=cutoff), plus=PlusConfig(**OFF, lossy_misses=lossy))
    hw = hardware or s.cfg.hardware
    gens, plan, _ = s.generate(method, hw, 20, spec_cfg=SpecConfig(num_draft_tokens=2))
    return method, hw, gens, plan


def test_lossy_misses_off_is_todays_spmoe_plus(twin):
    _, _, gens, _ = _lossy(twin, "off")
    assert [g.token_ids for g in gens] == twin.reference
    assert twin.last_extra["lossy_misses"] == "off"
    assert not any(k.startswith("lossy_") and k != "lossy_misses" for k in twin.last_extra)


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_lossy_misses_move_quantized_bytes_past_the_cutoff_and_report_lossless_false(twin, precision):
    from spmoe.models import int4
    from spmoe.summary import summarize_run
    from spmoe.trace.lossless import check_lossless

    method, hw, gens, plan = _lossy(twin, precision)
    extra, layout = twin.last_extra, twin.target.layout
    h, inter, dsize = layout.hidden_size, layout.intermediate_size, 4  # tiny twin: float32
    lossy_bytes = (3 * inter * h + (2 * inter + h) * dsize if precision == "int8" else
                   int4.int4_bytes(2 * inter, h, 128, dsize) + int4.int4_bytes(h, inter, 128, dsize))
    records = [r for g in gens for r in g.records]
    misses = {layer: sum(len(ev.misses) for r in records for ev in r.layers if ev.layer == layer)
              for layer in layout.moe_layers}
    lossy_layers = layout.moe_layers[2:]  # cutoff index 1: MoE layers 2 and 3 load low-precision copies
    assert extra["lossy_first_layer"] == lossy_layers[0] and extra["lossy_bytes_per_expert"] == lossy_bytes
    assert extra["lossy_loads"] == sum(misses[l] for l in lossy_layers) > 0
    assert extra["lossy_load_bytes"] == extra["lossy_loads"] * lossy_bytes
    exact_loads = sum(misses[l] for l in layout.moe_layers[:2]) + sum(r.num_prefetched for r in records)
    assert sum(r.h2d_bytes for r in records) == exact_loads * plan.expert_bytes + extra["lossy_loads"] * lossy_bytes
    assert extra["lossy_expert_computes"] > extra["lossy_loads"]  # later hits reuse the lossy copies (counted)
    check = check_lossless(twin, gens)
    summary = summarize_run(twin, method, hw, gens, plan, None, check, spec_cfg=SpecConfig(num_draft_tokens=2))
    assert summary["lossless"] is False and summary["lossless_reason"].startswith("lossy by design")
    assert f"lossy_misses={precision}" in summary["lossless_reason"]
    assert summary["token_agreement"] >= (0.95 if precision == "int8" else 0.9)


def test_lossy_staging_buffer_takes_a_slot_of_the_budget(twin):
    hw = _budget_for_slots(twin, 6)
    _, _, _, plan = _lossy(twin, "int8", hardware=hw, num_slots=None)
    assert plan.num_slots == 5 and twin.last_extra["lossy_staging_slots"] == 1
    assert twin.last_extra["extra_slots"] == 0


def test_lossy_misses_never_used_leave_the_run_judged_by_its_tokens(twin):
    _, _, gens, _ = _lossy(twin, "int4", cutoff=3)  # every MoE layer prefetched: no lossy layer
    assert [g.token_ids for g in gens] == twin.reference
    extra = twin.last_extra
    assert extra["lossy_first_layer"] is None and extra["lossy_loads"] == extra["lossy_expert_computes"] == 0
    assert extra["lossy_reason"] is None


def test_host_experts_are_recorded_per_layer_forward(twin):
    """Each layer forward names the experts it computed on the host (`LayerEvents.host`), apart from the
    device-served ones in `needed`; their count is the run's host expert count."""
    gens, _, _ = _plus(twin, "host_all")
    layers = [ev for g in gens for r in g.records for ev in r.layers]
    assert any(ev.host for ev in layers)
    assert all(not set(ev.host) & set(ev.needed) for ev in layers)
    assert sum(len(ev.host) for ev in layers) == twin.last_extra["host_experts"]


def test_lossless_check_recomputes_the_runs_host_experts_on_the_host(twin, monkeypatch):
    """A host arithmetic that differs from the device's (planted: host outputs scaled) changes the run's
    tokens; the check's reference recomputes exactly the run's host experts with the run's function, so
    the run is judged lossless against it, and with that mirror switched off the same tokens are not."""
    import spmoe.plus.host_experts as host_experts
    import spmoe.trace.lossless as lossless

    real = host_experts.expert_mlp
    monkeypatch.setattr(host_experts, "expert_mlp", lambda *a, **k: 4.0 * real(*a, **k))
    gens, _, _ = _plus(twin, "host_all")
    assert [g.token_ids for g in gens] != twin.reference  # the planted arithmetic shows in the tokens
    check = lossless.check_lossless(twin, gens)
    assert check.lossless is True and check.host_mirrored > 0 and check.host_unrouted == 0, check.reason
    assert "host experts on the host" in check.reason
    assert check.summary()["lossless_host_mirrored"] == check.host_mirrored
    monkeypatch.setattr(lossless, "has_host_experts", lambda gens: False)
    assert lossless.check_lossless(twin, gens).lossless is False
    for idx in twin.target.layout.moe_layers:  # the reference's own experts modules are back
        assert type(twin.target.model.model.layers[idx].mlp.experts).__name__ != "HostMirroredExperts"

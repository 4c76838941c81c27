"""
Whether to speculate, and with which draft: the latency model behind
`method.plus.draft_precision=auto`, evaluated once per run from what is known before decoding.

Options: `none` (no draft: the target decodes one token per step and the draft's device memory
becomes expert slots) and the precisions the session's draft offers: bf16, int8, int4 for a dense
draft (`spmoe.plus.draft_precision` quantizes its linear layers), `as_configured` for a quantized
copy of the target (`draft.copy_of_target`; its precision is the draft preset's).

Model, per option o (L MoE layers of E experts, A routed per token, B bytes per expert; k draft
tokens per step, a acceptance per draft token; units ms and bytes, bandwidths in GB/s = 1e6 B/ms):
  S_o       expert slots: the memory plan without the draft (none), with it (bf16, as_configured), or
            with it plus the bytes quantization saves // B (int8, int4); capped by method.num_slots
  h_o       = min(1, S_o / (L E))        hit rate of routing spread evenly over layers and experts
  T         = k + 1 positions per verify step with a draft, 1 without
  u(T)      = E (1 - (1 - A / E)^T)       distinct experts one layer forward of T tokens needs
  n         = sum_{i=0..k} a^i            expected tokens emitted per step (1 without a draft)
            (u and n: `spmoe.plus.step_model`, shared with the adaptive k)
  miss_ms   = L u(T) (1 - h_o) B / link   link time of the step's missing experts
  verify_ms = (W_t + L u(T) B) / bw + H_t layer_ms      the target's step with every expert resident
  draft_ms  = k (R_o / bw + H_o layer_ms)               (0 without a draft)
  TPOT_o    = (draft_ms + verify_ms + max(0, miss_ms - draft_ms)) / n     (without a draft: + miss_ms)
W_t: the target's non-expert bytes; layer_ms: host time of one layer forward beyond its bytes;
H_t, H_o: the layers of target and draft that pay it: under hardware.decode=eager every decoder layer
(each launches its kernels from Python), under static / graphs only MoE layers (their route's
device-to-host sync and expert dispatch; dense layers replay in graphs, bound by their bytes), so a
dense draft pays none and a copy of the target L; R_o: bytes one
draft token reads: the dense draft's weights (bf16); for int8 / int4 its unquantized weights plus its
sites' quantized bytes where `spmoe.runtime.quant_gemv`'s kernel serves the run's device (it reads each
quantized weight once), else plus twice its sites' bf16 bytes as well (each forward dequantizes a site
into a workspace it writes and reads); for a quantized copy of the target W_t bits / 16 + L A B (2 +
bits / 16) where the kernel serves (its linear layers read quantized; its experts read quantized,
dequantized into a transient written and read), else (W_t + L A B)(2 + bits / 16). The `- draft_ms` credits SP-MoE's
prefetch with hiding copies behind drafting (an upper bound). link = the link the run's copies get:
hardware.pcie_gb_per_s when copies are paced to it (or the measured pinned host-to-device bandwidth if
lower), the measured bandwidth on an unpaced CUDA device, else hardware.pcie_gb_per_s or
plus.choice_link_gb_per_s; bw =
plus.choice_device_gb_per_s; layer_ms = plus.choice_layer_ms; a = the replayed trace's acceptance
(successes / trials over its drafted rows) when routing is replayed, else plus.accept_prior.
Left out, as they move every option alike or are measured only in the run: host-computed experts
(they lower the cost of a miss for every option), skew and locality of real routing (real hit rates
are higher than h_o for every option: the model ranks options, it does not predict hit rates), the
adaptive k (k is spec.num_draft_tokens), lossy staging slots, a quantized draft's lower acceptance
(a quantized pick is checked by calibration agreement when the method builds).
Decision: the option with the least TPOT_o; ties to the earlier of none, bf16, int8, int4.
Fallback: a configured draft (bf16, int8, int4, as_configured) that does not fit the budget beside the target
(the session's plan with the draft has fewer slots than top_k) is not taken: the run decodes without a draft
and its summary says why (`draft_choice_fallback`). The plan counts a dense draft at its full precision, so a
draft that would fit only once quantized falls back too.
Invariants: pure given its inputs (the session asks at every plan of a run and must get the same
answer); a `none` run never counts the draft in its memory plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spmoe.config import DRAFT_PRECISIONS
from spmoe.offload.budget import capped_slots
from spmoe.offload.pacing import pinned_gb_per_s
from spmoe.plus.draft_precision import estimate_precision
from spmoe.plus.step_model import expected_emitted, union_size
from spmoe.runtime import quant_gemv
from spmoe.strategy import DraftOffer

NONE = "none"
AS_CONFIGURED = "as_configured"
ORDER = (NONE, "bf16", "int8", "int4", AS_CONFIGURED)


@dataclass(frozen=True)
class ModelShape:
    """The option-independent inputs of the model."""

    num_moe_layers: int  # L
    num_target_host_layers: int  # H_t
    num_experts: int  # E per layer
    top_k: int  # A
    expert_bytes: int  # B
    non_expert_bytes: int  # W_t
    num_draft_tokens: int  # k
    acceptance: float  # a
    link_gb_per_s: float
    device_gb_per_s: float
    layer_ms: float


@dataclass(frozen=True)
class DraftOption:
    name: str  # none | bf16 | int8 | int4 | as_configured
    num_slots: int  # S_o
    draft_read_bytes: int = 0  # R_o (0: no draft)
    num_draft_host_layers: int = 0  # H_o


@dataclass
class DraftChoice:
    choice: str
    predicted_ms: dict[str, float]  # option -> TPOT_o
    num_slots: dict[str, int]  # option -> S_o
    acceptance: float
    acceptance_source: str  # trace | accept_prior
    link_gb_per_s: float
    fallback: str | None = None  # why a configured draft was not taken (it does not fit the budget)

    def summary(self) -> dict:
        return {"draft_choice": self.choice, "draft_choice_predicted_ms": self.predicted_ms,
                "draft_choice_slots": self.num_slots, "draft_choice_acceptance": self.acceptance,
                "draft_choice_acceptance_source": self.acceptance_source,
                "draft_choice_link_gb_per_s": self.link_gb_per_s, "draft_choice_fallback": self.fallback}


def predict_tpot_ms(shape: ModelShape, option: DraftOption) -> float:
    drafts = option.name != NONE
    k = shape.num_draft_tokens if drafts else 0
    u = union_size(shape.num_experts, shape.top_k, k + 1)
    hit = min(1.0, option.num_slots / (shape.num_moe_layers * shape.num_experts))
    expert_step_bytes = shape.num_moe_layers * u * shape.expert_bytes
    miss_ms = expert_step_bytes * (1 - hit) / (shape.link_gb_per_s * 1e6)
    verify_ms = ((shape.non_expert_bytes + expert_step_bytes) / (shape.device_gb_per_s * 1e6)
                 + shape.num_target_host_layers * shape.layer_ms)
    draft_ms = k * (option.draft_read_bytes / (shape.device_gb_per_s * 1e6) + option.num_draft_host_layers * shape.layer_ms)
    emitted = expected_emitted(shape.acceptance, k)
    return (draft_ms + verify_ms + max(0.0, miss_ms - draft_ms)) / emitted


def choose(shape: ModelShape, options: list[DraftOption]) -> tuple[str, dict[str, float]]:
    """(the option with the least predicted TPOT, every option's prediction in ms)."""
    if not options:
        raise ValueError("no draft option to choose from")
    predicted = {o.name: predict_tpot_ms(shape, o) for o in options}
    best = min(options, key=lambda o: (predicted[o.name], ORDER.index(o.name)))
    return best.name, predicted


def trace_acceptance(trace) -> float | None:
    """Acceptance per draft token of a replayed trace: accepted drafts / (accepted + rejected), or None."""
    if trace is None:
        return None
    drafted = trace.row_drafted > 0
    accepted, num_drafted = trace.row_accepted[drafted], trace.row_drafted[drafted]
    trials = int(accepted.sum()) + int((accepted < num_drafted).sum())
    return int(accepted.sum()) / trials if trials else None


def _slots(offer: DraftOffer, free_slots: int) -> int:
    return capped_slots(min(offer.without_draft.num_experts_total, free_slots), offer.cfg.method.num_slots)


def link_gb_per_s(cfg) -> float:
    """The host-to-device bandwidth the run's expert copies get (see the module docstring)."""
    hw = cfg.hardware
    measured = pinned_gb_per_s(torch.device(hw.device)) if hw.device.startswith("cuda") and torch.cuda.is_available() \
        else None
    if hw.pace_pcie and hw.pcie_gb_per_s:  # pacing stretches copies to the card's rate, never speeds them up
        return min(hw.pcie_gb_per_s, measured) if measured else hw.pcie_gb_per_s
    return measured or hw.pcie_gb_per_s or cfg.method.plus.choice_link_gb_per_s


def inputs(offer: DraftOffer) -> tuple[ModelShape, list[DraftOption], str]:
    """The model's inputs for a run (`DraftOffer`, spmoe.strategy): shape, options, acceptance source."""
    cfg, pcfg, layout = offer.cfg, offer.cfg.method.plus, offer.target.layout
    measured = trace_acceptance(offer.routing_trace)
    eager = cfg.hardware.decode == "eager"
    num_target_layers = offer.target.model.config.num_hidden_layers
    shape = ModelShape(
        num_moe_layers=len(layout.moe_layers),
        num_target_host_layers=num_target_layers if eager else len(layout.moe_layers),
        num_experts=layout.num_experts, top_k=layout.top_k,
        expert_bytes=layout.expert_bytes, non_expert_bytes=offer.target.non_expert_bytes,
        num_draft_tokens=cfg.spec.num_draft_tokens,
        acceptance=pcfg.accept_prior if measured is None else measured,
        link_gb_per_s=link_gb_per_s(cfg),
        device_gb_per_s=pcfg.choice_device_gb_per_s, layer_ms=pcfg.choice_layer_ms)
    options = [DraftOption(NONE, _slots(offer, offer.without_draft.num_slots))]
    with_draft = offer.with_draft
    kernel = quant_gemv.serves(cfg.hardware.device, cfg.hardware.expert_kernel)  # quantized sites read once
    if with_draft is None:
        return shape, options, "accept_prior" if measured is None else "trace"
    if cfg.draft.copy_of_target:
        experts = shape.num_moe_layers * shape.top_k * shape.expert_bytes
        ratio = cfg.draft.quant_bits / (8 * layout.expert_bytes // layout.expert_numel)  # quantized / full bytes
        linear = ratio if kernel else 2 + ratio
        read = int(offer.target.non_expert_bytes * linear + experts * (2 + ratio))
        options.append(DraftOption(AS_CONFIGURED, _slots(offer, with_draft.num_slots), read, shape.num_target_host_layers))
    elif offer.draft is not None:
        host_layers = offer.draft.config.num_hidden_layers if eager else 0
        options.append(DraftOption("bf16", _slots(offer, with_draft.num_slots), offer.draft_weight_bytes, host_layers))
        for precision in ("int8", "int4"):
            est = estimate_precision(offer.draft, precision, pcfg.draft_group_size)
            gained = est.saved_bytes // layout.expert_bytes
            unquantized = offer.draft_weight_bytes - est.site_bytes  # embeddings, norms, a tied head
            read = unquantized + est.quantized_bytes + (0 if kernel else 2 * est.site_bytes)
            options.append(DraftOption(precision, _slots(offer, with_draft.num_slots + gained), read, host_layers))
    return shape, options, "accept_prior" if measured is None else "trace"


def decide(offer: DraftOffer) -> DraftChoice:
    """The run's draft: `none`, or the configured precision (`as_configured` for a quantized copy of the
    target), or for `auto` the model's least-TPOT option; predictions of every option either way."""
    mode = offer.cfg.method.plus.draft_precision
    if mode not in DRAFT_PRECISIONS:
        raise ValueError(f"method.plus.draft_precision={mode!r}; valid: {', '.join(DRAFT_PRECISIONS)}")
    shape, options, source = inputs(offer)
    best, predicted = choose(shape, options)
    fallback = None
    if mode == "auto":
        choice = best
    elif mode == NONE:
        choice = NONE
    elif offer.with_draft is None and offer.draft_weight_bytes:
        choice = NONE
        fallback = (f"draft_precision={mode}: the draft ({offer.draft_weight_bytes / 2**30:.2f} GiB of weights) does"
                    f" not fit the {offer.without_draft.budget_bytes / 2**30:.2f} GiB budget beside the target;"
                    f" decoding without a draft")
    else:
        choice = AS_CONFIGURED if offer.cfg.draft.copy_of_target else mode
    return DraftChoice(choice, predicted, {o.name: o.num_slots for o in options}, shape.acceptance, source,
                       shape.link_gb_per_s, fallback)


def accepts_draft(offer: DraftOffer) -> bool:
    """`StrategySpec.accepts_draft` for spmoe_plus: False when the run's choice is `none`."""
    return decide(offer).choice != NONE


def ranked_precisions(choice: DraftChoice) -> list[str]:
    """The draft's quantized precisions the model predicts faster than bf16, fastest first (auto's
    calibration order when the choice is a quantized draft)."""
    bf16 = choice.predicted_ms.get("bf16")
    quantized = [p for p in ("int8", "int4") if p in choice.predicted_ms
                 and (bf16 is None or choice.predicted_ms[p] < bf16)]
    return sorted(quantized, key=lambda p: (choice.predicted_ms[p], ORDER.index(p)))

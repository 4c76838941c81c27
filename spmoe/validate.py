"""
Run-config validation, before anything is loaded.

Two stages, both raising `ValueError` (a `CheckpointError` for checkpoint/config mismatches)
whose message names the key, the value given and what is valid:
- `validate_config(cfg)`: everything decidable from the config alone (names, ranges, knobs that
  depend on each other). Called first thing by `open_session`, before any file or model is read.
- `validate_against_model(cfg, hf_cfg, layout, model)`: what needs the target's shape (expert
  count, MoE depth, position limit), from its config and `meta` skeleton only; for `weights=checkpoint` also every
  checkpoint tensor's shape against the model built from its `config.json`. Called right after
  the skeleton is built, before any weight is allocated.
`validate_method` (with `validate_plus`), `validate_spec` and `validate_method_against_layout`
check one case's method and spec knobs; a session that runs several cases calls them per case.
"""

from __future__ import annotations

import math

from spmoe.config import (ATTENTION_IMPLEMENTATIONS, LoggerConfig, MethodConfig, PlusConfig, RunConfig, SpecConfig,
                          parse_dtype)
from spmoe.data.prompts import validate_dataset
from spmoe.methods import get_strategy
from spmoe.models.checkpoint import Checkpoint
from spmoe.offload.eviction import policy_names
from spmoe.policy.cutoff import MODES
from spmoe.predict.capture import CAPTURE_POINTS
from spmoe.tracking import VALID_MODES

MAX_DRAFT_TOKENS = 64  # k per verify step; the routing trace stores drafted counts as int16
MODEL_WEIGHTS = ("random", "checkpoint", "twin")
DRAFT_WEIGHTS = ("random", "checkpoint")
ROUTING_SOURCES = ("model", "replay", "auto")  # auto: resolved from the model preset by the session
CHECK_LOSSLESS = ("auto", "true", "false")


def _fail(key: str, value, valid: str) -> None:
    raise ValueError(f"{key}={value!r} is not valid; {valid}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate_spec(spec: SpecConfig, speculative: bool) -> None:
    """Speculative-decoding knobs: k (for SD methods), temperature and top_p."""
    k = spec.num_draft_tokens
    if not isinstance(k, int) or isinstance(k, bool):
        _fail("spec.num_draft_tokens", k, f"expected an integer in 1..{MAX_DRAFT_TOKENS}")
    if speculative and not 1 <= k <= MAX_DRAFT_TOKENS:
        _fail("spec.num_draft_tokens", k, f"valid: 1..{MAX_DRAFT_TOKENS} draft tokens per verify step")
    if not speculative and k < 0:
        _fail("spec.num_draft_tokens", k, "expected >= 0 (it is unused without speculative decoding)")
    if not _is_number(spec.temperature) or spec.temperature < 0:
        _fail("spec.temperature", spec.temperature, "valid: a finite number >= 0 (0 = greedy)")
    if not _is_number(spec.top_p) or not 0 < spec.top_p <= 1:
        _fail("spec.top_p", spec.top_p, "valid: 0 < top_p <= 1 (1 = no nucleus truncation)")


def validate_method(method: MethodConfig) -> None:
    """A method's knobs that need no model: name, eviction, slots, predictor, cutoff, runtime."""
    spec = get_strategy(method.name)  # unknown names list the registered methods
    if spec.offloads and method.eviction not in policy_names():
        _fail("method.eviction", method.eviction, f"valid: {policy_names()}")
    if method.num_slots is not None and (not isinstance(method.num_slots, int) or method.num_slots < 1):
        _fail("method.num_slots", method.num_slots, "valid: an integer >= 1, or null for all the budget allows")
    if method.predict_top_k is not None and (not isinstance(method.predict_top_k, int) or method.predict_top_k < 1):
        _fail("method.predict_top_k", method.predict_top_k,
              "valid: an integer from 1 to the target's expert count, or null for the target's top_k")
    if method.capture_point not in CAPTURE_POINTS:
        _fail("method.capture_point", method.capture_point, f"valid: {list(CAPTURE_POINTS)}")
    if not _is_number(method.timeout_s) or method.timeout_s <= 0:
        _fail("method.timeout_s", method.timeout_s, "valid: seconds > 0")
    if not _is_number(method.gating_threshold) or not 0 < method.gating_threshold <= 1:
        _fail("method.gating_threshold", method.gating_threshold, "valid: 0 < threshold <= 1")
    cutoff = method.cutoff
    if cutoff.mode not in MODES:
        _fail("method.cutoff.mode", cutoff.mode, f"valid: {list(MODES)}")
    if cutoff.mode == "fixed" and (not isinstance(cutoff.layer, int) or cutoff.layer < -1):
        _fail("method.cutoff.layer", cutoff.layer,
              "cutoff.mode=fixed needs the last prefetched MoE layer: an integer >= -1 (-1 = none)")
    if not isinstance(cutoff.reprofile, bool):
        _fail("method.cutoff.reprofile", cutoff.reprofile, "valid: true, false")
    validate_plus(method.plus)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def validate_plus(plus: PlusConfig) -> None:
    """spmoe_plus's numeric knobs (its mode names are checked when the dataclass is built)."""
    if not _is_number(plus.draft_min_agreement) or not 0 <= plus.draft_min_agreement <= 1:
        _fail("method.plus.draft_min_agreement", plus.draft_min_agreement, "valid: 0 <= agreement <= 1")
    if not _is_int(plus.draft_group_size) or plus.draft_group_size < 1:
        _fail("method.plus.draft_group_size", plus.draft_group_size, "valid: an integer >= 1 (input columns per scale)")
    if plus.host_threads is not None and (not _is_int(plus.host_threads) or plus.host_threads < 1):
        _fail("method.plus.host_threads", plus.host_threads, "valid: an integer >= 1, or null for all cores but two")
    if plus.host_max_per_layer is not None and (not _is_int(plus.host_max_per_layer) or plus.host_max_per_layer < 0):
        _fail("method.plus.host_max_per_layer", plus.host_max_per_layer, "valid: an integer >= 0, or null for no cap")
    if not _is_int(plus.k_min) or plus.k_min < 0:
        _fail("method.plus.k_min", plus.k_min, "valid: an integer >= 0 (the smallest draft length adaptive k may choose)")
    if not _is_number(plus.accept_prior) or not 0 <= plus.accept_prior <= 1:
        _fail("method.plus.accept_prior", plus.accept_prior, "valid: 0 <= acceptance <= 1")
    if plus.nosd_eviction not in policy_names():
        _fail("method.plus.nosd_eviction", plus.nosd_eviction, f"valid: {policy_names()}")


def validate_logger(logger: LoggerConfig) -> None:
    """The tracker's name and mode (the tracker itself is opened only after the run)."""
    if logger.name not in ("none", "wandb"):
        _fail("logger", logger.name, "valid: none, wandb")
    if logger.name == "wandb" and logger.mode not in VALID_MODES:
        _fail("logger.mode", logger.mode, f"valid: {', '.join(VALID_MODES)}")


def validate_config(cfg: RunConfig) -> None:
    """Everything in `cfg` that can be checked without reading a file or building a model."""
    cfg.check_lossless = str(cfg.check_lossless).lower()  # Hydra parses `true` as a bool
    if cfg.check_lossless not in CHECK_LOSSLESS:
        _fail("check_lossless", cfg.check_lossless, f"valid: {', '.join(CHECK_LOSSLESS)}")
    validate_method(cfg.method)
    speculative = get_strategy(cfg.method.name).speculative
    validate_spec(cfg.spec, speculative)
    for key in ("max_new_tokens", "num_prompts"):
        value = getattr(cfg, key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            _fail(key, value, "valid: an integer >= 1")
    if cfg.model.weights not in MODEL_WEIGHTS:
        _fail("model.weights", cfg.model.weights, f"valid: {', '.join(MODEL_WEIGHTS)}")
    if cfg.draft.weights not in DRAFT_WEIGHTS:
        _fail("draft.weights", cfg.draft.weights, f"valid: {', '.join(DRAFT_WEIGHTS)}")
    parse_dtype(cfg.model.dtype)
    parse_dtype(cfg.draft.dtype)
    if not _is_number(cfg.model.twin.expert_noise) or cfg.model.twin.expert_noise < 0:
        _fail("model.twin.expert_noise", cfg.model.twin.expert_noise, "valid: a finite number >= 0")
    hw = cfg.hardware
    if hw.gpu_budget_gib is not None and (not _is_number(hw.gpu_budget_gib) or hw.gpu_budget_gib <= 0):
        _fail("hardware.gpu_budget_gib", hw.gpu_budget_gib, "valid: GiB > 0, or null for the whole device")
    if hw.pcie_gb_per_s is not None and (not _is_number(hw.pcie_gb_per_s) or hw.pcie_gb_per_s <= 0):
        _fail("hardware.pcie_gb_per_s", hw.pcie_gb_per_s, "valid: GB/s > 0, or null")
    if hw.pace_pcie and hw.pcie_gb_per_s is None:
        _fail("hardware.pace_pcie", hw.pace_pcie, f"pacing needs hardware.pcie_gb_per_s (hardware {hw.name!r} has none)")
    if not _is_number(hw.reserve_mib) or hw.reserve_mib < 0:
        _fail("hardware.reserve_mib", hw.reserve_mib, "valid: MiB >= 0")
    if hw.attention not in ATTENTION_IMPLEMENTATIONS:
        _fail("hardware.attention", hw.attention, f"valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if cfg.routing.name not in ROUTING_SOURCES:
        _fail("routing", cfg.routing.name, f"valid: {', '.join(ROUTING_SOURCES)}")
    if cfg.routing.name == "replay" and not cfg.routing.trace_path:
        _fail("routing.trace_path", cfg.routing.trace_path,
              "routing=replay needs a routing_trace.npz file or a run directory holding one")
    if not isinstance(cfg.trace.lookahead_depth, int) or cfg.trace.lookahead_depth < 1:
        _fail("trace.lookahead_depth", cfg.trace.lookahead_depth, "valid: an integer >= 1")
    if cfg.routing.name == "model":
        validate_dataset(cfg.dataset)
    validate_logger(cfg.logger)


def validate_method_against_layout(method: MethodConfig, layout) -> None:
    """Method knobs bounded by the target's shape: predictor width, slot count, fixed cutoff layer."""
    num_layers, total = len(layout.moe_layers), len(layout.keys)
    if method.predict_top_k is not None and not 1 <= method.predict_top_k <= layout.num_experts:
        _fail("method.predict_top_k", method.predict_top_k,
              f"valid: 1..{layout.num_experts} (the target's experts per layer), or null for its top_k={layout.top_k}")
    if method.num_slots is not None and method.num_slots > total:
        _fail("method.num_slots", method.num_slots,
              f"valid: 1..{total} (the target has {num_layers} MoE layers x {layout.num_experts} experts),"
              " or null for all the budget allows")
    cutoff = method.cutoff
    if cutoff.mode == "fixed" and not -1 <= cutoff.layer < num_layers:
        _fail("method.cutoff.layer", cutoff.layer,
              f"valid: -1..{num_layers - 1} (MoE-layer ordinals of the target; -1 = prefetch none)")


def validate_against_model(cfg: RunConfig, hf_cfg, layout, model=None) -> None:
    """What needs the target's shape; with `model` (the meta skeleton) and `weights=checkpoint`,
    every checkpoint tensor's shape too (a `CheckpointError` naming the tensor and both shapes)."""
    validate_method_against_layout(cfg.method, layout)
    max_positions = getattr(hf_cfg, "max_position_embeddings", None)
    longest = cfg.dataset.max_prompt_tokens + cfg.max_new_tokens + cfg.spec.num_draft_tokens + 1
    if cfg.routing.name == "model" and max_positions and longest > max_positions:
        _fail("dataset.max_prompt_tokens", cfg.dataset.max_prompt_tokens,
              f"a prompt of up to {cfg.dataset.max_prompt_tokens} tokens + max_new_tokens={cfg.max_new_tokens} + k + 1"
              f" = {longest} positions exceeds the model's max_position_embeddings={max_positions}; lower"
              " dataset.max_prompt_tokens or max_new_tokens")
    if cfg.model.weights == "checkpoint" and model is not None:
        Checkpoint.open(cfg.model.path).check_model(model, layout)

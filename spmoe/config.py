"""
Typed run configuration: one dataclass per Hydra group, plus the top-level `RunConfig`.

Hydra composes `conf/` at the entry point and converts it once with `OmegaConf.to_object`;
below that, the library only sees these dataclasses (never a DictConfig). The schemas are
registered in Hydra's ConfigStore by `register_configs()`, so a typo in a YAML key or a wrong
type fails at compose time.

Units: sizes in bytes or GiB (`_gib`), times in milliseconds, bandwidth in GB/s (1e9 B/s).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; valid: {sorted(_DTYPES)}")
    return _DTYPES[name]


@dataclass
class TwinConfig:
    """How a target MoE is upcycled from its dense draft (`model.weights=twin`).

    Every expert = the draft's FFN + `expert_noise` x (a seeded Gaussian of the same std as the
    FFN weights, drawn per expert); attention, norms, embeddings and head are the draft's."""

    expert_noise: float = 0.1


@dataclass
class ModelConfig:
    """Target MoE model. `family` is the transformers `model_type`; `hf_config` its shape."""

    name: str = "tiny"
    family: str = "mixtral"
    weights: str = "random"  # random | checkpoint | twin (upcycled from the draft)
    path: str | None = None  # checkpoint directory (safetensors) when weights=checkpoint
    dtype: str = "float32"
    hf_config: dict[str, Any] = field(default_factory=dict)
    twin: TwinConfig = field(default_factory=TwinConfig)


@dataclass
class DraftConfig:
    """Dense (or small MoE) draft model for speculative decoding, fully on the device.

    `name: none` means no draft; SD methods then fail at start. With `copy_of_target`, the draft is a
    weight-only quantized copy of the target (`spmoe.models.quantized_draft`): `quant_bits` 8 (int8
    per output row) or 4 (int4 per group of `quant_group_size` input columns, two per byte)."""

    name: str = "none"
    family: str = "llama"
    weights: str = "random"  # random | checkpoint
    path: str | None = None
    dtype: str = "float32"
    hf_config: dict[str, Any] = field(default_factory=dict)
    copy_of_target: bool = False  # the draft is a quantized weight-only copy of the target (family/hf_config unused)
    quant_bits: int = 8  # copy_of_target: 8 | 4
    quant_group_size: int = 128  # copy_of_target with quant_bits=4: input columns per scale (even)

    def __post_init__(self) -> None:
        if self.quant_bits not in (8, 4):
            raise ValueError(f"draft.quant_bits={self.quant_bits!r}; valid: 8, 4")
        if self.quant_bits == 4 and (self.quant_group_size < 2 or self.quant_group_size % 2):
            raise ValueError(f"draft.quant_group_size={self.quant_group_size!r}; must be even and >= 2 (e.g. 128)")


@dataclass
class SpecConfig:
    """Speculative decoding: k draft tokens per step; temperature 0 = greedy (exact verification)."""

    num_draft_tokens: int = 1
    temperature: float = 0.0
    top_p: float = 1.0


@dataclass
class DatasetConfig:
    name: str = "synthetic"  # synthetic | humaneval
    prompt_len: int = 32  # synthetic: tokens per prompt
    max_prompt_tokens: int = 2048  # longer prompts are truncated from the left


@dataclass
class CutoffConfig:
    """Cutoff-layer policy: prefetch layers 0..L* only (see `spmoe.policy.cutoff`)."""

    mode: str = "auto"  # auto (L* from the latency model) | fixed (layer) | all | off (no prefetch)
    layer: int | None = None  # L* for mode=fixed
    profile_dir: str = "~/.cache/spmoe/profiles"


@dataclass
class MethodConfig:
    """An offloading method; `name` selects the registered strategy (see `spmoe.strategy`).

    Prefetch knobs are read only by prefetching methods (spmoe and the baselines with prefetch)."""

    name: str = "gpu_resident"
    eviction: str = "lru"  # lru | lfu | layer_distance | expected_reuse (spmoe.offload.eviction)
    num_slots: int | None = None  # cap on expert slots (default: all the memory plan allows)
    capture_point: str = "ffn_input"  # draft hidden fed to the target router: attn_out | residual | ffn_input
    predict_top_k: int | None = None  # experts predicted per draft token and layer (default: the target's top_k)
    worker_thread: bool = True  # prefetch issued by a background thread (false: inline on the main thread)
    batched_io: bool = True  # a layer's predicted experts submitted together (false: one synchronous copy each)
    timeout_s: float = 60.0  # no wait on the prefetch worker is longer than this
    adaptive_gating: bool = True  # adapmoe: drop low-sensitivity experts (changes outputs: lossless=false)
    gating_threshold: float = 0.85  # adapmoe: keep experts until the normalized top weights reach this
    trace_path: str | None = None  # moe_infinity: trace.jsonl file(s) / run dirs warming its activation collection
    cutoff: CutoffConfig = field(default_factory=CutoffConfig)


@dataclass
class HardwareConfig:
    """A device profile. A budget emulates a smaller card on a larger one (always labeled so)."""

    name: str = "cpu"
    device: str = "cpu"
    gpu_budget_gib: float | None = None  # None: no budget (the whole device)
    pcie_gb_per_s: float | None = None  # the emulated card's PCIe bandwidth
    pace_pcie: bool = False  # stretch every expert copy to pcie_gb_per_s (spmoe.offload.pacing)
    reserve_mib: float = 512.0  # CUDA workspaces, allocator fragmentation and temporaries
    emulated: bool = False


@dataclass
class LoggerConfig:
    name: str = "none"  # none | wandb
    project: str = "spmoe"
    mode: str = "offline"


@dataclass
class RoutingConfig:
    """Where the target's routing comes from: `model` (its routers) or `replay` (a recorded trace,
    see `spmoe.trace.replay`; prompts, routes, acceptance and predictions come from the trace)."""

    name: str = "model"  # model | replay
    trace_path: str | None = None  # replay: a routing_trace.npz file or a run directory holding one


@dataclass
class TraceConfig:
    routing: bool = False  # record routing_trace.npz (routes, predictions, acceptance; spmoe.trace.routing)
    lookahead_depth: int = 3  # gate-lookahead distances recorded per layer


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    spec: SpecConfig = field(default_factory=SpecConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    trace: TraceConfig = field(default_factory=TraceConfig)
    seed: int = 0
    max_new_tokens: int = 100
    num_prompts: int = 2
    check_lossless: str = "auto"  # auto | true | false: compare tokens with the gpu_resident reference
    resume: bool = True  # a run dir that already holds summary.json is finished: reuse it, do not rerun


def register_configs() -> None:
    """Register the schemas with Hydra's ConfigStore (called by the entry point only)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    for group, node in [
        ("model", ModelConfig),
        ("draft", DraftConfig),
        ("dataset", DatasetConfig),
        ("method", MethodConfig),
        ("hardware", HardwareConfig),
        ("logger", LoggerConfig),
        ("routing", RoutingConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)

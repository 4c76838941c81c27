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
    """How a target MoE is upcycled from its draft (`model.weights=twin`, `spmoe.models.twin`).

    Every expert = the draft's FFN + `expert_noise` x (a seeded Gaussian of the same std as the
    FFN weights, drawn per expert); attention, norms, embeddings and head are the draft's. A sparse
    draft's routers are copied too and its experts widened (the added neurons' output scaled by `expert_noise`)."""

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
    default_draft: str = "none"  # the paper's pairing: what `draft=auto` resolves to
    paper_card: str = "h200"  # the paper's GPU for this model: what `hardware=auto` resolves to on CUDA
    cpu_card: str = "cpu"  # what `hardware=auto` resolves to without CUDA
    default_routing: str = "model"  # what `routing=auto` resolves to with random weights: model | replay


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
    """Prompts (`spmoe.data.prompts`): a packaged offline set, a `datasets` hub/local set, or synthetic."""

    name: str = "synthetic"  # synthetic | humaneval | gsm8k | mtbench | hf | alpaca | cnn_dailymail | mmlu_pro
    prompt_len: int = 32  # synthetic: tokens per prompt
    max_prompt_tokens: int = 2048  # >= 1; longer prompts keep BOS and their last tokens (truncated from the left)
    path: str | None = None  # hf: a hub dataset name or a local .json/.jsonl/.parquet/.csv file
    field: str | None = None  # hf: the column holding the prompt text
    split: str = "train"  # hf: the split to read
    subset: str | None = None  # hf: the hub dataset's configuration name (e.g. 3.0.0), if it has several
    chat_template: str = "auto"  # auto (when the tokenizer has one) | true (required) | false


@dataclass
class CutoffConfig:
    """Cutoff-layer policy: prefetch layers 0..L* only (see `spmoe.policy.cutoff`)."""

    mode: str = "auto"  # auto (L* from the latency model) | fixed (layer) | all | off (no prefetch)
    layer: int | None = None  # L* for mode=fixed
    profile_dir: str = "~/.cache/spmoe/profiles"
    reprofile: bool = False  # measure the profile again even when a cached one matches its key


DRAFT_PRECISIONS = ("none", "bf16", "int8", "int4", "auto")  # method.plus.draft_precision


@dataclass
class PlusConfig:
    """spmoe_plus's parts (`spmoe.methods.spmoe_plus`), each switchable so its gain is measured alone.

    Draft precision: none runs without SD (the draft's memory goes to expert slots); bf16 keeps the
    session's draft; int8 / int4 quantize its linear weights (weight-only) for the run, and the bytes
    saved become expert slots; auto picks among none and the draft's precisions by the latency model
    of `spmoe.plus.draft_choice` (inputs: the memory plans, acceptance, the link, `choice_*`), and a
    quantized pick must reach `draft_min_agreement` greedy agreement with the unquantized draft on
    seeded calibration sequences. Host compute: off | auto (per missing expert, host vs copy from the
    cost model) | all (every missing expert on the host). Adaptive k: choose k per step in
    [k_min, spec.num_draft_tokens]. Lossy misses (off by default, labelled lossless=false): demand
    misses past the cutoff copy an int8 / int4 weight-only copy of the expert, dequantized on the device."""

    draft_precision: str = "int8"  # none | bf16 | int8 | int4 | auto
    draft_min_agreement: float = 0.95  # auto: calibration agreement a quantized draft needs
    draft_group_size: int = 128  # int4: input columns per scale
    host_compute: str = "auto"  # off | auto | all
    host_threads: int | None = None  # host compute threads (default: all cores but two)
    host_max_per_layer: int | None = None  # cap on experts computed on the host per layer forward
    host_fill: bool = False  # also load host-computed experts into free slots (never evicting), so they hit later
    host_reuse: bool = False  # auto: credit a load with the residency it buys (the layer calls' hit rate x copy_ms)
    adaptive_k: bool = False  # union-aware draft length per step (off: spec.num_draft_tokens every step)
    k_min: int = 0  # adaptive_k: the smallest k it may choose
    accept_prior: float = 0.8  # acceptance per draft token where none is measured (adaptive_k, draft choice)
    lossy_misses: str = "off"  # off | int8 | int4: demand misses past the cutoff load a quantized copy (lossless=false)
    lossy_group_size: int = 128  # lossy_misses=int4: input columns per scale and offset
    nosd_eviction: str = "lru"  # eviction without a draft (method.eviction's sd_lookahead looks ahead with the draft's predictions)
    choice_link_gb_per_s: float = 25.0  # draft choice: the link when the card names none (hardware.pcie_gb_per_s)
    choice_device_gb_per_s: float = 2000.0  # draft choice: device memory bandwidth a forward reads weights at
    choice_layer_ms: float = 0.5  # draft choice: host ms per layer forward beyond its bytes (spmoe.plus.draft_choice)

    def __post_init__(self) -> None:
        if self.lossy_misses not in ("off", "int8", "int4"):
            raise ValueError(f"method.plus.lossy_misses={self.lossy_misses!r}; valid: off, int8, int4")
        if self.draft_precision not in DRAFT_PRECISIONS:
            raise ValueError(f"method.plus.draft_precision={self.draft_precision!r}; valid: {', '.join(DRAFT_PRECISIONS)}")
        if self.host_compute not in ("off", "auto", "all"):
            raise ValueError(f"method.plus.host_compute={self.host_compute!r}; valid: off, auto, all")
        for name in ("choice_link_gb_per_s", "choice_device_gb_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"method.plus.{name}={getattr(self, name)!r}; must be > 0")
        if not self.choice_layer_ms >= 0:
            raise ValueError(f"method.plus.choice_layer_ms={self.choice_layer_ms!r}; must be >= 0")


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
    plus: PlusConfig = field(default_factory=PlusConfig)  # read by spmoe_plus only

    def __post_init__(self) -> None:
        if isinstance(self.plus, dict):  # presets loaded without Hydra
            self.plus = PlusConfig(**self.plus)


ATTENTION_IMPLEMENTATIONS = ("sdpa", "spmoe_sdpa")  # hardware.attention (spmoe.runtime.gqa_attention)


@dataclass
class HardwareConfig:
    """A device profile. A budget emulates a smaller card on a larger one (always labeled so)."""

    name: str = "cpu"
    device: str = "cpu"
    gpu_budget_gib: float | None = None  # None: no budget (the whole device)
    pcie_gb_per_s: float | None = None  # the emulated card's PCIe bandwidth
    pace_pcie: bool = False  # stretch every expert copy to pcie_gb_per_s (spmoe.offload.pacing)
    reserve_mib: float = 768.0  # CUDA and cuBLAS workspaces, CUDA-graph pools, allocator fragmentation, temporaries
    emulated: bool = False
    host_memory_gib: float | None = None  # host RAM the run may use (None: detected, see spmoe.offload.host_memory)
    # how target and draft forwards run (spmoe.runtime.decoder): eager (a dynamic KV cache) | static (a static
    # KV cache) | graphs (static, decode steps replayed as CUDA graphs where the forward has no host sync)
    decode: str = "eager"
    # decode-shape expert matmuls (spmoe.runtime.moe_gemv) and quantized drafts' linear layers
    # (spmoe.runtime.quant_gemv): auto (Triton kernels where they serve: CUDA bf16, SiLU experts, at most 16
    # tokens) | torch (torch's grouped GEMM; quantized weights dequantized, then multiplied)
    expert_kernel: str = "auto"
    # attention of target and draft (spmoe.runtime.gqa_attention), session-wide: spmoe_sdpa (query heads folded
    # into the query length, keys and values read in place, on CUDA; elsewhere transformers' SDPA) | sdpa
    # (transformers' SDPA; grouped keys and values expanded to every head)
    attention: str = "spmoe_sdpa"

    def __post_init__(self) -> None:
        if self.decode not in ("eager", "static", "graphs"):
            raise ValueError(f"hardware.decode={self.decode!r}; valid: eager, static, graphs")
        if self.expert_kernel not in ("auto", "torch"):
            raise ValueError(f"hardware.expert_kernel={self.expert_kernel!r}; valid: auto, torch")
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"hardware.attention={self.attention!r}; valid: {', '.join(ATTENTION_IMPLEMENTATIONS)}")


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
    # replay: let CUDA graphs capture the replay's router hooks (static route buffers, spmoe.trace.replay);
    # off: a replayed forward stays uncaptured (eager), and a routed forward outside an engine step is an error
    graphs: bool = True


@dataclass
class TraceConfig:
    routing: bool = False  # record routing_trace.npz (routes, predictions, acceptance; spmoe.trace.routing)
    lookahead_depth: int = 3  # gate-lookahead distances recorded per layer


@dataclass
class ExperimentConfig:
    """A set of cases compared against one loaded model and store, timed in interleaved rounds.

    `cases` maps a case name (its run directory) to the Hydra overrides that make it (e.g.
    `[method=spmoe, method.cutoff.mode=fixed, method.cutoff.layer=8]`); cases may differ in method,
    hardware card and `spec.*`, never in model, draft, dataset, routing or seed. Round r runs the
    cases in order for even r and reversed for odd r (A B C C B A)."""

    name: str | None = None  # None: a plain run (one case, one round)
    description: str = ""
    rounds: int = 1
    warmup_tokens: int = 8  # each case decodes this many tokens of the first prompt before round 0 (0: none)
    profile: bool = False  # cProfile each case's last round into <case dir>/profile.txt (host time by function)
    cases: dict[str, list[str]] = field(default_factory=dict)
    only: list[str] = field(default_factory=list)  # run just these cases (empty: all), e.g. experiment.only=[spmoe]
    time_limit_s: float | None = None  # skip rounds / lossless checks that would end past this (spmoe.time_limit)


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
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)
    seed: int = 0
    max_new_tokens: int = 100
    num_prompts: int = 2
    check_lossless: str = "auto"  # auto | true | false: compare tokens with the gpu_resident reference
    resume: bool = True  # a run dir whose summary.json has this config's hash is finished: reuse it
    progress: str = "auto"  # auto (a bar on a terminal, none in sweeps) | true | false


def unknown_keys(plain: dict, schema: type = None, prefix: str = "") -> list[str]:
    """Keys of a composed config (plain dict) that the dataclass schema has no field for: an added
    key (`+key=value`) that conversion to the typed config would silently drop."""
    import dataclasses
    import typing

    schema = schema or RunConfig
    hints = typing.get_type_hints(schema)
    names = {f.name for f in dataclasses.fields(schema)}
    found = []
    for key, value in plain.items():
        if key not in names:
            found.append(prefix + key)
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            found += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


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
        ("experiment", ExperimentConfig),
    ]:
        cs.store(group=group, name=f"{group}_schema", node=node)

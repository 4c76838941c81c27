"""
A session: one loaded target (non-expert weights on the device, experts in the host store), its
draft and its prompts, on which methods run one after another (`spmoe.experiment` runs cases).

Order (bad input fails before anything large is allocated): config validation -> device -> model
skeleton on `meta` -> prompts -> memory plan of every case against the budget and the host's
memory -> draft -> non-expert weights and expert store. Each `Session.generate` installs one
method's expert provider, runs the prompts through the one engine loop and frees it after.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import torch
from transformers import AutoModelForCausalLM

from spmoe.config import (
    HardwareConfig,
    MethodConfig,
    RunConfig,
    SpecConfig,
    parse_dtype,
)
from spmoe.data.prompts import load_prompts
from spmoe.data.tokenizer import load_tokenizer
from spmoe.engine import Engine, Generation
from spmoe.models.build import (
    TargetModel,
    fill_store,
    hf_config,
    materialize,
    param_bytes,
    skeleton,
)
from spmoe.models.checkpoint import Checkpoint
from spmoe.models.draft import build_draft, check_vocab, draft_hf_config
from spmoe.models.quantized_draft import build_quantized_copy, dequant_workspace_bytes, quantized_copy_bytes
from spmoe.models.twin import upcycle
from spmoe.offload.budget import (
    BudgetError,
    MemoryPlan,
    activation_bytes,
    kv_bytes,
    plan_memory,
)
from spmoe.offload.eviction import make_policy
from spmoe.offload.host_memory import check_host_memory
from spmoe.offload.store import ExpertStore
from spmoe.runtime import gqa_attention, moe_gemv
from spmoe.runtime.attention_backend import pin_deterministic_attention
from spmoe.spec.drafter import ModelDrafter
from spmoe.methods import STRATEGIES, get_strategy
from spmoe.strategy import DraftOffer, MethodContext
from spmoe.trace.attach import attach_recorder, attach_replay
from spmoe.summary import git_sha
from spmoe.trace.replay import RouteReplay
from spmoe.trace.routing import RoutingTrace, load_trace
from spmoe.validate import validate_against_model, validate_config

log = logging.getLogger(__name__)
GIB = 2**30
CAPTURE_FIT_ATTEMPTS = 2  # rebuilds a run may take to fit its precaptured graphs in the budget


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unsupported hardware.device {name!r}; valid: cpu, cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware device {name!r} needs CUDA, which is not available here; use hardware=cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported hardware.device {name!r}; valid: cpu, cuda[:N]")
    return device


def make_plan(cfg: RunConfig, hf_cfg, layout, non_expert_bytes: int, max_prompt_len: int,
              draft_bytes: int = 0) -> MemoryPlan:
    dtype_bytes = torch.finfo(parse_dtype(cfg.model.dtype)).bits // 8
    budget = None if cfg.hardware.gpu_budget_gib is None else int(cfg.hardware.gpu_budget_gib * GIB)
    return plan_memory(layout, budget, non_expert_bytes, draft_bytes=draft_bytes,
                       kv=kv_bytes(hf_cfg, _max_seq(cfg, max_prompt_len), dtype_bytes),
                       activations=activation_bytes(hf_cfg, layout, max_prompt_len, dtype_bytes),
                       reserve_bytes=int(cfg.hardware.reserve_mib * 2**20))


def _max_seq(cfg: RunConfig, max_prompt_len: int) -> int:
    return max_prompt_len + cfg.max_new_tokens + cfg.spec.num_draft_tokens + 1


def _reference_fits(plan: MemoryPlan, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    need = plan.num_experts_total * plan.expert_bytes + plan.kv_bytes + plan.activation_bytes + plan.reserve_bytes
    return need <= free_bytes


@dataclass
class Session:
    """A loaded target (non-expert weights on the device, experts in the host store), the draft
    model when one is configured, and the prompts.

    Several methods can run on one session one after another (the benchmark scripts do), each
    with its own memory plan; each run installs its own experts provider and frees it after.
    Budget accounting per method: the draft counts only for speculative methods, so a method's
    `peak_gpu_bytes` = its own allocation peak + the resident weights it uses."""

    cfg: RunConfig
    device: torch.device
    hf_cfg: object
    target: TargetModel
    tokenizer: object
    prompts: list
    draft: object = None  # PreTrainedModel | None
    last_extra: dict = field(default_factory=dict)  # the last run's method-specific totals (Runtime.extra_summary)
    routing_trace: RoutingTrace | None = None  # routing=replay: the trace every method replays
    last_routing: RoutingTrace | None = None  # trace.routing=true: the last run's recorded routing
    _capture_reserve_bytes: dict = field(default_factory=dict)  # repr((method, hardware, spec)) -> extra reserve
    _method_memory: dict = field(default_factory=dict)  # repr((method, hardware, spec)) -> MethodContext.memory

    @property
    def has_draft(self) -> bool:
        return self.draft is not None or self.cfg.draft.copy_of_target

    @property
    def draft_weight_bytes(self) -> int:
        if self.draft is None:  # a quantized copy of the target is built after the target: estimate it
            return quantized_copy_bytes(self.target, *self._quant) if self.cfg.draft.copy_of_target else 0
        return param_bytes(self.draft)

    @property
    def _quant(self) -> tuple[int, int]:
        return self.cfg.draft.quant_bits, self.cfg.draft.quant_group_size

    def draft_bytes(self) -> int:
        """Draft weights + its KV cache at the run's longest sequence (+ a quantized copy's dequant workspace)."""
        if not self.has_draft:
            return 0
        config = self.draft.config if self.draft is not None else self.hf_cfg
        dtype_bytes = torch.finfo(parse_dtype(self.cfg.draft.dtype)).bits // 8
        max_prompt = max(len(p.token_ids) for p in self.prompts)
        workspace = 0
        if self.cfg.draft.copy_of_target:
            kernels = moe_gemv.serves_quantized(self.device, self.target.layout.dtype, self.target.act_fn)
            workspace = dequant_workspace_bytes(self.target, *self._quant, int8_kernels=kernels)
        return self.draft_weight_bytes + workspace + kv_bytes(config, _max_seq(self.cfg, max_prompt), dtype_bytes)

    def plan(self, hardware: HardwareConfig, method: str, method_cfg: MethodConfig | None = None,
             spec_cfg: SpecConfig | None = None) -> MemoryPlan:
        """The run's memory plan; the draft counts when the run drafts (`drafts`). `method_cfg` / `spec_cfg`
        (default: the session's when it names `method`, else the method's defaults) reach a method's
        `accepts_draft`."""
        return self._run_plan(hardware, self._method_cfg(method, method_cfg), spec_cfg)[0]

    def _run_plan(self, hardware: HardwareConfig, method: MethodConfig, spec_cfg: SpecConfig | None,
                  ) -> tuple[MemoryPlan, bool, DraftOffer | None]:
        """(the run's memory plan, whether it drafts, the offer its method's `accepts_draft` judged), the
        offer made once."""
        spec = get_strategy(method.name)
        drafts, offer = self._draft_decision(hardware, method, spec_cfg)
        if drafts and not self.has_draft:
            raise ValueError(f"method {method.name!r} uses speculative decoding and needs a draft model: pass"
                             f" draft=<name> (valid: {_draft_names()})")
        cfg = replace(self.cfg, hardware=hardware)
        plan = make_plan(cfg, self.hf_cfg, self.target.layout, self.target.non_expert_bytes,
                         max(len(p.token_ids) for p in self.prompts),
                         draft_bytes=self.draft_bytes() if drafts else 0)
        if not spec.offloads and plan.num_slots < plan.num_experts_total:
            raise BudgetError(
                f"method {spec.name} keeps all {plan.num_experts_total} experts on the device"
                f" ({plan.num_experts_total * plan.expert_bytes / GIB:.2f} GiB) but the budget of"
                f" {plan.budget_bytes / GIB:.2f} GiB leaves room for {plan.num_slots}; use an offloading method:"
                f" {sorted(s.name for s in STRATEGIES.values() if s.offloads)}")
        return plan, drafts, offer

    def _method_cfg(self, method: str, method_cfg: MethodConfig | None) -> MethodConfig:
        if method_cfg is not None:
            return method_cfg
        return self.cfg.method if self.cfg.method.name == method else MethodConfig(name=method)

    def drafts(self, hardware: HardwareConfig, method: MethodConfig, spec_cfg: SpecConfig | None = None) -> bool:
        """Whether a run of `method` drafts: a speculative method that, if it has `accepts_draft`, accepts
        the session's draft for this run (the hook sees the plans with and without the draft)."""
        return self._draft_decision(hardware, method, spec_cfg)[0]

    def _draft_decision(self, hardware: HardwareConfig, method: MethodConfig, spec_cfg: SpecConfig | None,
                        ) -> tuple[bool, DraftOffer | None]:
        """(whether the run drafts, the offer its method's `accepts_draft` judged, if it has one)."""
        spec = get_strategy(method.name)
        offer = self.draft_offer(hardware, method, spec_cfg) if spec.speculative and spec.accepts_draft else None
        return spec.speculative and (offer is None or spec.accepts_draft(offer)), offer

    def draft_offer(self, hardware: HardwareConfig, method: MethodConfig, spec_cfg: SpecConfig | None = None) -> DraftOffer:
        """The run's config with the plans with and without the draft (as `plan` would make them)."""
        cfg = replace(self.cfg, hardware=hardware, method=method, spec=spec_cfg or self.cfg.spec)
        max_prompt = max(len(p.token_ids) for p in self.prompts)
        args = (replace(self.cfg, hardware=hardware), self.hf_cfg, self.target.layout, self.target.non_expert_bytes,
                max_prompt)
        without = make_plan(*args)
        with_draft = None
        if self.has_draft:
            try:
                with_draft = make_plan(*args, draft_bytes=self.draft_bytes())
            except BudgetError:
                with_draft = None
        return DraftOffer(cfg, self.target, self.draft, self.draft_weight_bytes if self.has_draft else 0,
                          with_draft, without, self.routing_trace)

    def generate(self, method: MethodConfig, hardware: HardwareConfig, max_new_tokens: int,
                 num_prompts: int | None = None, spec_cfg: SpecConfig | None = None,
                 on_prompt: Callable[[int], None] | None = None,
                 ) -> tuple[list[Generation], MemoryPlan, int | None]:
        """Run one method over the prompts: (generations, memory plan, peak device bytes).
        `on_prompt(num_tokens)` is called after each prompt (progress bars)."""
        run = self._build(method, hardware, max_new_tokens, num_prompts, spec_cfg)
        try:
            gens = []
            for i, p in enumerate(self.prompts[:num_prompts]):
                try:
                    gens.append(run.engine.generate(p.token_ids, max_new_tokens, i))
                    if on_prompt is not None:
                        on_prompt(len(gens[-1].token_ids))
                except BaseException as exc:
                    exc.finished_generations = gens  # the prompts done before the failure are kept
                    raise
            runtime = run.runtime
            self.last_extra = runtime.extra_summary() if runtime.extra_summary else {}
            self.last_extra.update(run.replay.summary() if run.replay else {"routing": "model"})
            self.last_extra["prefetching"] = runtime.prefetch  # False also where every expert is resident
            self.last_extra["capture_reserve_bytes"] = run.capture_reserve_bytes
            self.last_routing = None if run.recorder is None else run.recorder.to_trace(
                [p.token_ids for p in self.prompts], gens, self._trace_meta(run.cfg, run.drafts))
            peak = None
            _log_memory(self.device, "generated", run.allocated_at_start)
            if self.device.type == "cuda":
                peak = (torch.cuda.max_memory_allocated(self.device) - run.allocated_at_start
                        + self._resident_bytes(run.drafts))
        finally:
            run.runtime.close()
        return gens, run.plan, peak

    def _build(self, method: MethodConfig, hardware: HardwareConfig, max_new_tokens: int, num_prompts: int | None,
               spec_cfg: SpecConfig | None) -> "_BuiltRun":
        """A run's runtime and engine, built and precaptured within its budget.

        The plan's reserve is an estimate; what the precaptured CUDA graphs hold is known only once they are
        captured. So after `Engine.reserve` the run's peak is projected (`projected_overrun_bytes`); where it
        would pass the budget, the run is built again with the overrun added to its reserve (fewer expert slots),
        and later runs of the same method, card and draft length start from that reserve. A method that keeps
        every expert resident, or a reserve the budget cannot plan, runs as built (its summary then records
        `within_budget: false`)."""
        spec = get_strategy(method.name)
        run_key = repr((method, hardware, spec_cfg))
        for attempt in itertools.count():  # the attempt after CAPTURE_FIT_ATTEMPTS rebuilds always returns
            extra_bytes = self._capture_reserve_bytes.get(run_key, 0)
            hw = _with_reserve(hardware, extra_bytes)
            plan, drafts, offer = self._run_plan(hw, method, spec_cfg)
            cfg = replace(self.cfg, method=method, hardware=hw, max_new_tokens=max_new_tokens,
                          spec=spec_cfg or self.cfg.spec)
            ctx = MethodContext(cfg, self.target, self.device, plan, self.draft if drafts else None,
                                self.routing_trace, offer, self._method_memory.setdefault(run_key, {}))
            allocated_at_start = 0
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                allocated_at_start = torch.cuda.memory_allocated(self.device)
            runtime = spec.build(ctx)
            if runtime.cache is not None:
                plan = replace(plan, num_slots=runtime.cache.num_slots)
            try:
                replay = recorder = None
                if self.routing_trace is not None:
                    replay = attach_replay(runtime, self.routing_trace, self.target.layout, drafts,
                                           cfg.spec.num_draft_tokens, cfg.routing.graphs)
                if cfg.trace.routing:
                    recorder = attach_recorder(runtime, self.target.layout, cfg.trace.lookahead_depth)
                drafter = None
                if drafts:
                    drafter = ModelDrafter(self.draft, self.device, cfg.spec.temperature, cfg.spec.top_p,
                                           cfg.hardware.decode, runtime.draft_listeners)
                engine = Engine(runtime, self.device, drafter, cfg.spec, cfg.seed, cfg.hardware.decode)
                _log_memory(self.device, "built", allocated_at_start)
                engine.reserve(max(len(p.token_ids) for p in self.prompts[:num_prompts]), max_new_tokens)
                _log_memory(self.device, "precaptured", allocated_at_start)
                overrun = projected_overrun_bytes(self.device, plan, allocated_at_start, self._resident_bytes(drafts))
            except BaseException:
                runtime.close()
                raise
            if not (overrun > 0 and attempt < CAPTURE_FIT_ATTEMPTS and spec.offloads
                    and self._fits_with_reserve(hardware, method, spec_cfg, extra_bytes + overrun)):
                return _BuiltRun(cfg, plan, drafts, runtime, engine, replay, recorder, allocated_at_start, extra_bytes)
            runtime.close()
            log.warning("%s: the precaptured graphs would pass the budget by %.1f MiB; rebuilding with that much"
                        " more reserve", method.name, overrun / 2**20)
            self._capture_reserve_bytes[run_key] = extra_bytes + overrun

    def _resident_bytes(self, drafts: bool) -> int:
        """Device bytes a run holds from before its start: the non-expert weights, and the draft's weights
        and dequantization workspace when it drafts."""
        workspace = getattr(self.draft, "dequant_workspace", None)  # a quantized copy's, allocated at open
        return self.target.non_expert_bytes + (
            self.draft_weight_bytes + (0 if workspace is None else workspace.numel()) if drafts else 0)

    def _fits_with_reserve(self, hardware: HardwareConfig, method: MethodConfig, spec_cfg: SpecConfig | None,
                           extra_bytes: int) -> bool:
        """Whether the run can still be planned with `extra_bytes` more reserve (else it runs as built)."""
        try:
            self._run_plan(_with_reserve(hardware, extra_bytes), method, spec_cfg)
        except BudgetError:
            return False
        return True

    def _trace_meta(self, cfg: RunConfig, speculative: bool) -> dict:
        return {"model": cfg.model.name, "weights": cfg.model.weights, "draft": cfg.draft.name if speculative else None,
                "method": cfg.method.name, "dataset": cfg.dataset.name, "seed": cfg.seed,
                "spec_k": cfg.spec.num_draft_tokens if speculative else 0, "temperature": cfg.spec.temperature,
                "capture_point": cfg.method.capture_point, "max_new_tokens": cfg.max_new_tokens,
                "routing": "replay" if self.routing_trace is not None else "model", "git_sha": git_sha()}

    def reference_fits(self) -> bool:
        plan = self.plan(replace(self.cfg.hardware, gpu_budget_gib=None), "gpu_resident")
        return _reference_fits(plan, self.device)

    def touch_store(self) -> None:
        """Copy every expert once to the device through one scratch buffer (CUDA only): the first DMA
        from each registered host page is not what a timed round should measure."""
        if self.device.type != "cuda":
            return
        layout, store = self.target.layout, self.target.store
        scratch = torch.empty(layout.expert_numel, dtype=layout.dtype, device=self.device)  # [numel]
        for key in layout.keys:
            scratch.copy_(store.flat(key), non_blocking=True)
        torch.cuda.synchronize(self.device)
        del scratch

    def close(self) -> None:
        self.target.store.close()


def _runs_here_hint(cfg: RunConfig, device: torch.device) -> str:
    if device.type == "cpu" and cfg.model.paper_card not in ("cpu", cfg.hardware.name):
        return (f"model={cfg.model.name} is meant for a CUDA GPU (its card: hardware={cfg.model.paper_card}) and"
                " there is none here. A command that runs here: python run.py model=tiny")
    return "A command that runs here: python run.py model=tiny"


def _draft_names() -> list[str]:
    from experiments.presets import preset_names

    return [n for n in preset_names("draft") if n not in ("none", "auto")]


def open_session(cfg: RunConfig, cases: Sequence[RunConfig] = (),
                 budget_errors: dict[int, BudgetError] | None = None) -> Session:
    """Validate names, plan memory for cfg's method and hardware and for every other case's (failing
    before any large allocation, host memory included), then load the draft (if any) and the target.

    With `budget_errors` (a dict), a case whose plan does not fit its card is recorded there by its
    index in `(cfg, *cases)` instead of raising, unless no case fits."""
    for case in (cfg, *cases):
        unresolved = [g for g in ("draft", "hardware", "routing") if getattr(case, g).name == "auto"]
        if unresolved:
            raise ValueError(f"{', '.join(unresolved)}=auto is resolved by the entry point (run.py, via"
                             " spmoe.auto.auto_choices); a library caller passes explicit presets")
        validate_config(case)
    spec = get_strategy(cfg.method.name)
    if spec.offloads:
        make_policy(cfg.method.eviction)
    if cfg.model.weights == "twin" and cfg.draft.name == "none":
        raise ValueError("model.weights=twin upcycles the target from its draft: pass draft=<name>"
                         f" (valid: {_draft_names()})")
    for group in (cfg.model, cfg.draft):  # presets may point into ~/.cache
        if group.path:
            group.path = os.path.expanduser(group.path)
    device = resolve_device(cfg.hardware.device)
    moe_gemv.use(cfg.hardware.expert_kernel)
    pin_deterministic_attention(device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # subnormal activations slow CPU matmuls several-fold
    hf_cfg = hf_config(cfg.model)
    model, layout = skeleton(hf_cfg, parse_dtype(cfg.model.dtype))
    validate_against_model(cfg, hf_cfg, layout, model)
    for case in cases:
        validate_against_model(case, hf_cfg, layout)
    draft_cfg = None
    if cfg.draft.name != "none" and not cfg.draft.copy_of_target:
        draft_cfg = draft_hf_config(cfg.draft)
        try:
            check_vocab(hf_cfg, draft_cfg, cfg.draft.name)
        except ValueError as exc:
            raise ValueError(f"{exc}; model={cfg.model.name} pairs with draft={cfg.model.default_draft}"
                             " (or draft=auto)") from None
    if cfg.draft.copy_of_target and cfg.model.weights == "twin":
        raise ValueError("a twin target is built from its draft; a draft copied from the target cannot be its source")
    tokenizer = load_tokenizer(cfg.model.path if cfg.model.weights == "checkpoint" else None, hf_cfg.vocab_size)
    routing_trace = None
    if cfg.routing.name == "replay":
        if not cfg.routing.trace_path:
            raise ValueError("routing=replay needs routing.trace_path (a routing_trace.npz or a run directory)")
        routing_trace = load_trace(cfg.routing.trace_path)
        replay = RouteReplay(routing_trace, layout, spec.speculative, cfg.spec.num_draft_tokens)  # mismatches fail here
        for case in cases:  # each case replays with its own method and k
            RouteReplay(routing_trace, layout, get_strategy(case.method.name).speculative, case.spec.num_draft_tokens)
        prompts = replay.prompts(hf_cfg.vocab_size, cfg.num_prompts, cfg.max_new_tokens)
    elif cfg.routing.name == "model":
        prompts = load_prompts(cfg.dataset, tokenizer, hf_cfg.vocab_size, cfg.num_prompts, cfg.seed)
    else:
        raise ValueError(f"unknown routing {cfg.routing.name!r}; valid: model, replay")
    target = TargetModel(model, layout, None, param_bytes(model), cfg.model.weights)
    session = Session(cfg, device, hf_cfg, target, tokenizer, prompts, routing_trace=routing_trace)
    if draft_cfg is not None:
        with torch.device("meta"):
            session.draft = AutoModelForCausalLM.from_config(draft_cfg, dtype=parse_dtype(cfg.draft.dtype))  # sizes only
    for i, case in enumerate((cfg, *cases)):
        try:
            plan = session.plan(case.hardware, case.method.name, case.method, case.spec)
        except BudgetError as exc:
            if budget_errors is None:
                raise
            log.error("case %d (%s on %s) does not fit: %s", i, case.method.name, case.hardware.name, exc)
            budget_errors[i] = exc
            continue
        log.info("memory plan (%s on %s): %s", case.method.name, case.hardware.name, plan)
        check_host_memory(plan, device.type, cfg.hardware.host_memory_gib, _runs_here_hint(cfg, device))
    if budget_errors is not None and len(budget_errors) == 1 + len(cases):
        raise budget_errors[0]
    if draft_cfg is not None:
        session.draft = build_draft(cfg.draft, draft_cfg, device, cfg.seed + 7)
    if cfg.model.weights == "checkpoint":
        Checkpoint.open(cfg.model.path).check_experts(list(layout.moe_layers), layout.num_experts)
    materialize(model, cfg.model, device, cfg.seed)
    target.store = ExpertStore(layout, pin=device.type == "cuda")
    try:
        if cfg.model.weights == "twin":
            upcycle(model, layout, target.store, session.draft, cfg.model.twin, cfg.seed)
        else:
            fill_store(target.store, cfg.model, device, cfg.seed, std=getattr(hf_cfg, "initializer_range", 0.02))
        if cfg.draft.copy_of_target:
            session.draft = build_quantized_copy(target, device, *session._quant)
    except BaseException:
        target.store.close()
        raise
    for m in (model, session.draft):
        if m is not None:
            gqa_attention.select(m, cfg.hardware.attention)
    return session


def _with_reserve(hardware: HardwareConfig, extra_bytes: int) -> HardwareConfig:
    """`hardware` with `extra_bytes` more reserve (what a run's precaptured graphs were measured to need)."""
    return replace(hardware, reserve_mib=hardware.reserve_mib + extra_bytes / 2**20)


@dataclass
class _BuiltRun:
    """What `Session._build` hands `Session.generate`: one run's config, plan, runtime and engine."""

    cfg: RunConfig
    plan: MemoryPlan
    drafts: bool
    runtime: object  # spmoe.strategy.Runtime
    engine: Engine
    replay: object  # the attached RouteReplay, or None
    recorder: object  # the attached routing recorder, or None
    allocated_at_start: int  # device bytes allocated when the build began
    capture_reserve_bytes: int  # reserve added to the plan's for the precaptured graphs


def projected_overrun_bytes(device: torch.device, plan: MemoryPlan, allocated_at_start_bytes: int,
                            resident_bytes: int) -> int:
    """By how many bytes a built run's peak would pass its budget (0 if it fits, or without CUDA or a budget):
    the larger of its peak so far and its allocation now plus the planned activations, above its start, plus
    the weights resident from before it."""
    if device.type != "cuda" or plan.budget_bytes is None:
        return 0
    now = torch.cuda.memory_allocated(device) - allocated_at_start_bytes + plan.activation_bytes
    peak = torch.cuda.max_memory_allocated(device) - allocated_at_start_bytes
    return max(0, max(now, peak) + resident_bytes - plan.budget_bytes)


def _log_memory(device: torch.device, stage: str, allocated_at_start_bytes: int) -> None:
    """Log the run's device allocation above its start, now and at its peak so far (where a budget overrun began)."""
    if device.type == "cuda":
        now = torch.cuda.memory_allocated(device) - allocated_at_start_bytes
        peak = torch.cuda.max_memory_allocated(device) - allocated_at_start_bytes
        log.info("memory %s: %.3f GiB allocated by the run, peak %.3f GiB", stage, now / 2**30, peak / 2**30)

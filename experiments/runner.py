"""
One benchmark run, without Hydra: RunConfig in, run directory + summary dict out.

Order (bad input fails before anything large is allocated): method and dataset names ->
device -> model skeleton on `meta` -> prompts -> memory plan against the budget -> non-expert
weights and expert store -> GPU-resident reference tokens (when computable) -> the method's
run through the one engine loop -> trace.jsonl, generations.jsonl, summary.json (each written
atomically; summary.json last, so its presence marks a finished run).
"""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers

from spmoe.config import HardwareConfig, MethodConfig, RunConfig, parse_dtype
from spmoe.data.prompts import load_prompts
from spmoe.data.tokenizer import load_tokenizer
from spmoe.engine import Engine, Generation
from spmoe.io import write_json_atomic, write_jsonl_atomic
from spmoe.models.build import TargetModel, fill_store, hf_config, materialize, param_bytes, skeleton
from spmoe.offload.budget import BudgetError, MemoryPlan, activation_bytes, kv_bytes, plan_memory
from spmoe.offload.store import ExpertStore
from spmoe.strategy import MethodContext, get_strategy
from spmoe.trace.metrics import summarize

log = logging.getLogger(__name__)
GIB = 2**30


def resolve_device(name: str) -> torch.device:
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"hardware device {name!r} needs CUDA, which is not available here; use hardware=cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; valid: cpu, cuda[:N]")
    return device


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def make_plan(cfg: RunConfig, hf_cfg, layout, non_expert_bytes: int, max_prompt_len: int) -> MemoryPlan:
    dtype_bytes = torch.finfo(parse_dtype(cfg.model.dtype)).bits // 8
    budget = None if cfg.hardware.gpu_budget_gib is None else int(cfg.hardware.gpu_budget_gib * GIB)
    max_seq = max_prompt_len + cfg.max_new_tokens + 16
    return plan_memory(layout, budget, non_expert_bytes, draft_bytes=0,
                       kv=kv_bytes(hf_cfg, max_seq, dtype_bytes),
                       activations=activation_bytes(hf_cfg, layout, max_prompt_len, dtype_bytes),
                       reserve_bytes=int(cfg.hardware.reserve_mib * 2**20))


def _reference_fits(plan: MemoryPlan, device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    free_bytes, _ = torch.cuda.mem_get_info(device)
    need = plan.num_experts_total * plan.expert_bytes + plan.kv_bytes + plan.activation_bytes + plan.reserve_bytes
    return need <= free_bytes


@dataclass
class Session:
    """A loaded target (non-expert weights on the device, experts in the host store) and its prompts.

    Several methods can run on one session one after another (the benchmark scripts do), each
    with its own memory plan; each run installs its own experts provider and frees it after."""

    cfg: RunConfig
    device: torch.device
    hf_cfg: object
    target: TargetModel
    tokenizer: object
    prompts: list

    def plan(self, hardware: HardwareConfig, method: str) -> MemoryPlan:
        cfg = replace(self.cfg, hardware=hardware)
        plan = make_plan(cfg, self.hf_cfg, self.target.layout, self.target.non_expert_bytes,
                         max(len(p.token_ids) for p in self.prompts))
        spec = get_strategy(method)
        if not spec.offloads and plan.num_slots < plan.num_experts_total:
            raise BudgetError(
                f"method {spec.name} keeps all {plan.num_experts_total} experts on the device"
                f" ({plan.num_experts_total * plan.expert_bytes / GIB:.2f} GiB) but the budget of"
                f" {plan.budget_bytes / GIB:.2f} GiB leaves room for {plan.num_slots}; use an offloading method")
        return plan

    def generate(self, method: MethodConfig, hardware: HardwareConfig, max_new_tokens: int,
                 num_prompts: int | None = None) -> tuple[list[Generation], MemoryPlan, int | None]:
        """Run one method over the prompts: (generations, memory plan, peak device bytes)."""
        plan = self.plan(hardware, method.name)
        cfg = replace(self.cfg, method=method, hardware=hardware, max_new_tokens=max_new_tokens)
        ctx = MethodContext(cfg, self.target, self.device, plan)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        runtime = get_strategy(method.name).build(ctx)
        try:
            engine = Engine(runtime, self.device)
            prompts = self.prompts[:num_prompts]
            gens = [engine.generate(p.token_ids, max_new_tokens, i) for i, p in enumerate(prompts)]
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        finally:
            runtime.close()
        return gens, plan, peak

    def reference_fits(self) -> bool:
        plan = self.plan(replace(self.cfg.hardware, gpu_budget_gib=None), "gpu_resident")
        return _reference_fits(plan, self.device)

    def close(self) -> None:
        self.target.store.close()


def open_session(cfg: RunConfig) -> Session:
    """Validate names, plan memory for cfg's method and hardware (failing before any large
    allocation), then load the target."""
    get_strategy(cfg.method.name)
    if cfg.check_lossless not in ("auto", "true", "false"):
        raise ValueError(f"check_lossless={cfg.check_lossless!r}; valid: auto, true, false")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    device = resolve_device(cfg.hardware.device)
    hf_cfg = hf_config(cfg.model)
    model, layout = skeleton(hf_cfg, parse_dtype(cfg.model.dtype))
    tokenizer = load_tokenizer(cfg.model.path if cfg.model.weights == "checkpoint" else None, hf_cfg.vocab_size)
    prompts = load_prompts(cfg.dataset, tokenizer, hf_cfg.vocab_size, cfg.num_prompts, cfg.seed)
    target = TargetModel(model, layout, None, param_bytes(model), cfg.model.weights)
    session = Session(cfg, device, hf_cfg, target, tokenizer, prompts)
    log.info("memory plan: %s", session.plan(cfg.hardware, cfg.method.name))
    materialize(model, cfg.model, device, cfg.seed)
    target.store = ExpertStore(layout, pin=device.type == "cuda")
    try:
        fill_store(target.store, cfg.model, device, cfg.seed, std=getattr(hf_cfg, "initializer_range", 0.02))
    except BaseException:
        target.store.close()
        raise
    return session


def summarize_run(session: Session, method: MethodConfig, hardware: HardwareConfig, gens: list[Generation],
                  plan: MemoryPlan, peak: int | None, reference: list[list[int]] | None) -> dict:
    cfg, spec = session.cfg, get_strategy(method.name)
    lossless, agreement = None, None
    if reference is not None:
        same = [sum(a == b for a, b in zip(g.token_ids, r)) for g, r in zip(gens, reference)]
        agreement = sum(same) / sum(len(r) for r in reference[: len(gens)])
        lossless = all(g.token_ids == r for g, r in zip(gens, reference))
    within_budget = None if plan.budget_bytes is None or peak is None else peak <= plan.budget_bytes
    return {
        "method": spec.name,
        "model": cfg.model.name,
        "draft": None,
        "dataset": cfg.dataset.name,
        "hardware": hardware.name,
        "hardware_emulated": hardware.emulated,
        "weights": cfg.model.weights,
        "dtype": cfg.model.dtype,
        "eviction": method.eviction if spec.offloads else None,
        "seed": cfg.seed,
        "max_new_tokens": len(gens[0].token_ids) if gens else cfg.max_new_tokens,
        **summarize([g.records for g in gens]),
        "num_slots": plan.num_slots if spec.offloads else plan.num_experts_total,
        "num_experts_total": plan.num_experts_total,
        "expert_bytes": plan.expert_bytes,
        "non_expert_bytes": plan.non_expert_bytes,
        "kv_bytes_planned": plan.kv_bytes,
        "activation_bytes_planned": plan.activation_bytes,
        "peak_gpu_bytes": peak,
        "gpu_budget_bytes": plan.budget_bytes,
        "within_budget": within_budget,
        "lossless": lossless,
        "token_agreement": agreement,
        "device": _device_name(session.device),
        "git_sha": _git_sha(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def write_run(out_dir: str | Path, session: Session, gens: list[Generation], summary: dict) -> None:
    """trace.jsonl and generations.jsonl, then summary.json: each atomic, the summary last."""
    out_dir = Path(out_dir)
    write_jsonl_atomic(out_dir / "trace.jsonl", (r.to_dict() for g in gens for r in g.records))
    write_jsonl_atomic(out_dir / "generations.jsonl", (
        {"prompt_idx": i, "prompt_id": p.prompt_id, "token_ids": g.token_ids, "text": session.tokenizer.decode(g.token_ids)}
        for i, (p, g) in enumerate(zip(session.prompts, gens))))
    write_json_atomic(out_dir / "summary.json", summary)


def run_benchmark(cfg: RunConfig, out_dir: str | Path) -> dict:
    session = open_session(cfg)
    try:
        reference = None
        want_ref = cfg.check_lossless == "true" or (cfg.check_lossless == "auto" and session.reference_fits())
        if want_ref and cfg.method.name != "gpu_resident":
            ref_hw = replace(cfg.hardware, gpu_budget_gib=None)
            gens, _, _ = session.generate(MethodConfig(name="gpu_resident"), ref_hw, cfg.max_new_tokens)
            reference = [g.token_ids for g in gens]
        gens, plan, peak = session.generate(cfg.method, cfg.hardware, cfg.max_new_tokens)
        if cfg.method.name == "gpu_resident" and want_ref:
            reference = [g.token_ids for g in gens]
    finally:
        session.close()
    summary = summarize_run(session, cfg.method, cfg.hardware, gens, plan, peak, reference)
    write_run(out_dir, session, gens, summary)
    if summary["within_budget"] is False:
        raise BudgetError(f"peak GPU memory {peak / GIB:.2f} GiB exceeded the budget of {plan.budget_bytes / GIB:.2f} GiB"
                          f" (summary.json records within_budget=false)")
    return summary

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
from pathlib import Path

import torch
import transformers

from spmoe.config import RunConfig, parse_dtype
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


def generate_all(ctx: MethodContext, method: str, prompts, max_new_tokens: int) -> list[Generation]:
    runtime = get_strategy(method).build(ctx)
    try:
        engine = Engine(runtime, ctx.device)
        return [engine.generate(p.token_ids, max_new_tokens, i) for i, p in enumerate(prompts)]
    finally:
        runtime.close()


def run_benchmark(cfg: RunConfig, out_dir: str | Path) -> dict:
    out_dir = Path(out_dir)
    spec = get_strategy(cfg.method.name)
    if cfg.check_lossless not in ("auto", "true", "false"):
        raise ValueError(f"check_lossless={cfg.check_lossless!r}; valid: auto, true, false")
    if cfg.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    device = resolve_device(cfg.hardware.device)
    hf_cfg = hf_config(cfg.model)
    model, layout = skeleton(hf_cfg, parse_dtype(cfg.model.dtype))
    tokenizer = load_tokenizer(cfg.model.path if cfg.model.weights == "checkpoint" else None, hf_cfg.vocab_size)
    prompts = load_prompts(cfg.dataset, tokenizer, hf_cfg.vocab_size, cfg.num_prompts, cfg.seed)
    non_expert = param_bytes(model)
    plan = make_plan(cfg, hf_cfg, layout, non_expert, max(len(p.token_ids) for p in prompts))
    if not spec.offloads and plan.num_slots < plan.num_experts_total:
        raise BudgetError(f"method {spec.name} keeps all {plan.num_experts_total} experts on the device"
                          f" ({plan.num_experts_total * plan.expert_bytes / GIB:.2f} GiB) but the budget of"
                          f" {plan.budget_bytes / GIB:.2f} GiB leaves room for {plan.num_slots}; use an offloading method")
    log.info("memory plan: %s", plan)

    materialize(model, cfg.model, device, cfg.seed)
    store = ExpertStore(layout, pin=device.type == "cuda")
    try:
        fill_store(store, cfg.model, device, cfg.seed, std=getattr(hf_cfg, "initializer_range", 0.02))
        ctx = MethodContext(cfg, TargetModel(model, layout, store, non_expert, cfg.model.weights), device, plan)

        reference = None
        want_ref = cfg.check_lossless == "true" or (cfg.check_lossless == "auto" and _reference_fits(plan, device))
        if want_ref and spec.name != "gpu_resident":
            reference = [g.token_ids for g in generate_all(ctx, "gpu_resident", prompts, cfg.max_new_tokens)]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        gens = generate_all(ctx, spec.name, prompts, cfg.max_new_tokens)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    finally:
        store.close()

    if spec.name == "gpu_resident" and want_ref:
        reference = [g.token_ids for g in gens]
    lossless, agreement = None, None
    if reference is not None:
        same = [sum(a == b for a, b in zip(g.token_ids, r)) for g, r in zip(gens, reference)]
        agreement = sum(same) / sum(len(r) for r in reference)
        lossless = all(g.token_ids == r for g, r in zip(gens, reference))
    within_budget = None if plan.budget_bytes is None or peak is None else peak <= plan.budget_bytes

    summary = {
        "method": spec.name,
        "model": cfg.model.name,
        "draft": None,
        "dataset": cfg.dataset.name,
        "hardware": cfg.hardware.name,
        "hardware_emulated": cfg.hardware.emulated,
        "weights": cfg.model.weights,
        "dtype": cfg.model.dtype,
        "eviction": cfg.method.eviction if spec.offloads else None,
        "seed": cfg.seed,
        "max_new_tokens": cfg.max_new_tokens,
        **summarize([g.records for g in gens]),
        "num_slots": plan.num_slots,
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
        "device": _device_name(device),
        "git_sha": _git_sha(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    write_jsonl_atomic(out_dir / "trace.jsonl", (r.to_dict() for g in gens for r in g.records))
    write_jsonl_atomic(out_dir / "generations.jsonl", (
        {"prompt_idx": i, "prompt_id": p.prompt_id, "token_ids": g.token_ids, "text": tokenizer.decode(g.token_ids)}
        for i, (p, g) in enumerate(zip(prompts, gens))))
    write_json_atomic(out_dir / "summary.json", summary)
    if within_budget is False:
        raise BudgetError(f"peak GPU memory {peak / GIB:.2f} GiB exceeded the budget of {plan.budget_bytes / GIB:.2f} GiB"
                          f" (summary.json records within_budget=false)")
    return summary

"""
A run's summary and output files: `summary.json` (the contract of DESIGN.md section 9),
`trace.jsonl`, `generations.jsonl`, and `partial/` for a failed run's finished prompts.

Invariants: every file is written atomically (temp file + rename); `summary.json` is written
last, so its presence marks a finished run. Times in ms, sizes in bytes unless a key says so.
"""

from __future__ import annotations

import platform
import subprocess
import traceback
from pathlib import Path

import torch
import transformers

from spmoe.config import HardwareConfig, MethodConfig, SpecConfig
from spmoe.data.prompts import chat_template_applies
from spmoe.engine import Generation
from spmoe.io import write_json_atomic, write_jsonl_atomic
from spmoe.methods import get_strategy
from spmoe.offload.budget import MemoryPlan
from spmoe.trace.lossless import declare_lossy, summary_block
from spmoe.trace.metrics import summarize
from spmoe.trace.oracle import access_sequence, belady_misses


def git_sha() -> str | None:
    """HEAD's commit, with "+dirty" when tracked files differ from it (the code that ran is not that commit)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True,
                              timeout=5).stdout.strip()

    try:
        sha = git("rev-parse", "HEAD")
        if not sha:
            return None
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):  # no git, or it hung (TimeoutExpired)
        return None


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"


def summarize_run(session, method: MethodConfig, hardware: HardwareConfig, gens: list[Generation],
                  plan: MemoryPlan, peak: int | None, reference, spec_cfg: SpecConfig | None = None) -> dict:
    """`reference`: a `spmoe.trace.lossless.LosslessCheck`, reference token lists (exact comparison), or None."""
    cfg, spec = session.cfg, get_strategy(method.name)
    spec_cfg = spec_cfg or cfg.spec
    within_budget = None if plan.budget_bytes is None or peak is None else peak <= plan.budget_bytes
    metrics = summarize([g.records for g in gens])
    oracle = {}
    if spec.offloads:
        misses = belady_misses(access_sequence(g.records for g in gens), plan.num_slots)
        oracle_bytes = misses * plan.expert_bytes
        oracle = {"oracle_h2d_bytes": oracle_bytes,
                  "policy_efficiency": metrics["h2d_bytes"] / oracle_bytes if oracle_bytes else None}
    return {
        "method": spec.name,
        "model": cfg.model.name,
        "draft": cfg.draft.name if spec.speculative else None,
        "num_draft_tokens": spec_cfg.num_draft_tokens if spec.speculative else None,
        "temperature": spec_cfg.temperature,
        "dataset": cfg.dataset.name,
        "hardware": hardware.name,
        "hardware_emulated": hardware.emulated,
        "pcie_paced_gb_per_s": hardware.pcie_gb_per_s if hardware.pace_pcie and spec.offloads else None,
        "decode": hardware.decode,
        "expert_kernel": hardware.expert_kernel,
        "attention": hardware.attention,
        "weights": cfg.model.weights,
        "twin_expert_noise": cfg.model.twin.expert_noise if cfg.model.weights == "twin" else None,
        "dtype": cfg.model.dtype,
        "eviction": method.eviction if spec.offloads else None,
        "seed": cfg.seed,
        "max_new_tokens": len(gens[0].token_ids) if gens else cfg.max_new_tokens,
        **result_knobs(session, method, spec_cfg, spec, gens),
        **metrics,
        **oracle,
        **session.last_extra,
        "distinct_token_ratio": distinct_token_ratio(session, gens),
        "num_slots": plan.num_slots if spec.offloads else plan.num_experts_total,
        "num_experts_total": plan.num_experts_total,
        "expert_bytes": plan.expert_bytes,
        "non_expert_bytes": plan.non_expert_bytes,
        "draft_bytes_planned": plan.draft_bytes,
        "kv_bytes_planned": plan.kv_bytes,
        "activation_bytes_planned": plan.activation_bytes,
        "peak_gpu_bytes": peak,
        "gpu_budget_bytes": plan.budget_bytes,
        "within_budget": within_budget,
        **declare_lossy(summary_block(reference, gens, spec_cfg.temperature), session.last_extra.get("lossy_reason")),
        "device": _device_name(session.device),
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }


def result_knobs(session, method: MethodConfig, spec_cfg: SpecConfig, spec, gens: list[Generation]) -> dict:
    """The remaining knobs that change a run's results (sampling, prompts, draft, offloading switches)."""
    cfg, ds = session.cfg, session.cfg.dataset
    replay = session.routing_trace is not None
    return {
        "top_p": spec_cfg.top_p,
        "draft_dtype": cfg.draft.dtype if spec.speculative else None,
        "draft_quant_bits": cfg.draft.quant_bits if spec.speculative and cfg.draft.copy_of_target else None,
        "max_prompt_tokens": ds.max_prompt_tokens,
        "prompt_len": ds.prompt_len if ds.name == "synthetic" else None,
        "dataset_source": None if replay or not ds.path else {"path": ds.path, "field": ds.field, "split": ds.split,
                                                              "subset": ds.subset},
        "chat_template": None if replay else chat_template_applies(ds, session.tokenizer),
        "prompt_tokens_truncated": sum(p.truncated_tokens for p in session.prompts[: len(gens)]),
        "capture_point": method.capture_point if spec.offloads and spec.speculative else None,
        "predict_top_k": method.predict_top_k if spec.offloads and spec.speculative else None,
        "worker_thread": method.worker_thread if spec.offloads else None,
        "batched_io": method.batched_io if spec.offloads else None,
        "adaptive_gating": method.adaptive_gating if method.name.startswith("adapmoe") else None,
        "gating_threshold": method.gating_threshold if method.name.startswith("adapmoe") else None,
    }


def distinct_token_ratio(session, gens: list[Generation]) -> float:
    """Distinct / emitted tokens, mean over prompts; under replay, of the traced model's own text
    (the replaying model's tokens are arbitrary)."""
    trace = session.routing_trace
    texts = [trace.generation(i)[: len(g.token_ids)] for i, g in enumerate(gens)] if trace else [
        g.token_ids for g in gens]
    return sum(len(set(t)) / len(t) for t in texts) / len(texts)


def write_run(out_dir: str | Path, session, gens: list[Generation], summary: dict) -> None:
    """routing_trace.npz (when recorded), trace.jsonl and generations.jsonl, then summary.json: each
    atomic, the summary last."""
    out_dir = Path(out_dir)
    if session.last_routing is not None:
        session.last_routing.save(out_dir / "routing_trace.npz")
    write_jsonl_atomic(out_dir / "trace.jsonl", (r.to_dict() for g in gens for r in g.records))
    write_jsonl_atomic(out_dir / "generations.jsonl", (
        {"prompt_idx": i, "prompt_id": p.prompt_id, "token_ids": g.token_ids, "text": session.tokenizer.decode(g.token_ids)}
        for i, (p, g) in enumerate(zip(session.prompts, gens))))
    write_json_atomic(out_dir / "summary.json", summary)


def write_partial(out_dir: Path, session, gens: list[Generation], exc: BaseException) -> None:
    """A failed run keeps its finished prompts under `partial/` (never a summary.json)."""
    if not gens:
        return
    partial = Path(out_dir) / "partial"
    write_jsonl_atomic(partial / "trace.jsonl", (r.to_dict() for g in gens for r in g.records))
    write_jsonl_atomic(partial / "generations.jsonl", (
        {"prompt_idx": i, "prompt_id": p.prompt_id, "token_ids": g.token_ids} for i, (p, g) in
        enumerate(zip(session.prompts, gens))))
    write_json_atomic(partial / "error.json", {"error": repr(exc), "finished_prompts": len(gens),
                                                "traceback": "".join(traceback.format_exception(exc))})

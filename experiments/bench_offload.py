"""
Offloading methods side by side (SP-MoE vs the baselines), each with and without SD, on one
loaded pair under one or more emulated GPU budgets.

    python -m experiments.bench_offload --model mixtral --draft mistral_7b --out results/offload      # GPU
    python -m experiments.bench_offload --routing replay --trace results/real_pair/traces/humaneval_k1.npz \
        --budgets rtx4090,a100_40g --out results/offload_replay                                        # GPU
    python -m experiments.bench_offload --model tiny --draft tiny --device cpu --num-slots 12 --out /tmp/o

Routing: `model` runs a twinned pair (the target's experts = the draft's FFN + noise, so the
draft's hidden states predict the target's routes); `replay` runs random weights whose routes,
acceptance outcomes and predictions are replayed from a recorded trace (`spmoe.trace.replay`).
Cases: method names, plus SP-MoE variants `spmoe_L<n>` (fixed cutoff at MoE layer n), `spmoe_all`,
`spmoe_off`, `spmoe_lru` (LRU eviction), `spmoe_er` (expected_reuse eviction), `spmoe_noworker`,
`spmoe_nobatch`, `spmoe_attn_out`, `spmoe_residual` (capture points; meaningless under replay,
whose predictions are recorded).
`--cases` run at every budget, `--first-budget-cases` (cutoff sweep, ablations) at the first only.

For every method: TPOT, acceptance, hit rate, prefetch coverage / waste, predictor accuracy,
H2D bytes per token, and the two distance-to-the-limit ratios of DESIGN.md section 5:
runtime efficiency = TPOT / (H2D bytes per token / link bandwidth + compute), where the link is the
measured pinned bandwidth (or, with `--pace-pcie`, the paced one) and compute is
the GPU-resident TPOT of the same decoding mode (SD or not) measured in the same process, and
policy efficiency = H2D bytes / Belady-oracle bytes for the run's own access sequence.
Writes `<out>/<budget>/{main.csv,table.md,runs.json,meta.json}`; prints the tables last.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from spmoe.trace.oracle import runtime_efficiency
from spmoe.policy.profile import measure_bandwidth_gb_per_s
from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.summary import summarize_run
from spmoe.config import (CutoffConfig, HardwareConfig, MethodConfig, RoutingConfig, RunConfig, SpecConfig,
                          TwinConfig)
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.methods import get_strategy

log = logging.getLogger("bench_offload")
GIB = 2**30
DEFAULT_CASES = ("lru_nosd,lru,spmoe,spmoe_lru,spmoe_all,spmoe_off,mixtral_offloading,mixtral_offloading_nosd,"
                 "moe_infinity,moe_infinity_nosd,adapmoe,adapmoe_nosd")


ABLATIONS = {
    "spmoe_lru": {"eviction": "lru"},  # the paper's LRU cache instead of layer-distance eviction
    "spmoe_er": {"eviction": "expected_reuse"},  # estimated-next-use eviction (experiments.eviction_sim)
    "spmoe_noworker": {"worker_thread": False},
    "spmoe_nobatch": {"batched_io": False},
    "spmoe_attn_out": {"capture_point": "attn_out"},
    "spmoe_residual": {"capture_point": "residual"},
}


def method_for(case: str, num_slots: int | None) -> MethodConfig:
    """Case name -> method config (`spmoe_all` / `spmoe_off` / `spmoe_L<n>` are cutoff ablations)."""
    if case in ABLATIONS:
        return MethodConfig(**{"name": "spmoe", "num_slots": num_slots, "eviction": "layer_distance",
                               **ABLATIONS[case]})
    if case.startswith("spmoe_"):
        mode = case.split("_", 1)[1]
        cutoff = CutoffConfig(mode="fixed", layer=int(mode[1:])) if mode.startswith("L") else CutoffConfig(mode=mode)
        return MethodConfig(name="spmoe", num_slots=num_slots, eviction="layer_distance", cutoff=cutoff)
    if case == "spmoe":
        return MethodConfig(name="spmoe", num_slots=num_slots, eviction="layer_distance")
    return MethodConfig(name=case, num_slots=num_slots)


def session_config(args: argparse.Namespace, full: HardwareConfig) -> RunConfig:
    """The run config every case of a benchmark shares (model, draft, routing, prompts)."""
    draft = load_preset("draft", args.draft)
    if args.routing == "replay":  # routes come from the trace: random weights cost the same compute
        model = load_preset("model", args.model, weights="random")
        routing = RoutingConfig(name="replay", trace_path=args.trace)
    else:  # a draft copied from the target (int8_self) predicts a random target as well as a twin
        weights = "random" if draft.copy_of_target else "twin"
        model = load_preset("model", args.model, weights=weights, twin=TwinConfig(expert_noise=args.expert_noise))
        routing = RoutingConfig()
    return RunConfig(model=model, draft=draft, dataset=load_preset("dataset", args.dataset),
                     method=MethodConfig(name="gpu_resident_sd"), hardware=full,
                     spec=SpecConfig(num_draft_tokens=args.k), max_new_tokens=args.max_new_tokens,
                     num_prompts=args.num_prompts, routing=routing)


def reference_hardware(device: str) -> HardwareConfig:
    """The whole device, no budget: where the GPU-resident references run."""
    return load_preset("hardware", "h200" if device == "cuda" else "cpu", device=device)


def add_session_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--routing", choices=("model", "replay"), default="model")
    ap.add_argument("--trace", default="results/real_pair/traces/humaneval_k1.npz", help="routing=replay: the trace")
    ap.add_argument("--expert-noise", type=float, default=0.02, help="routing=model: the twin's expert noise")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_args(ap)
    ap.add_argument("--budgets", "--budget-hardware", default="rtx4090", help="hardware presets, comma-separated")
    ap.add_argument("--num-slots", type=int, default=None, help="cap the cache (CPU runs)")
    ap.add_argument("--pace-pcie", action="store_true", help="pace copies to each budget's pcie_gb_per_s")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--first-budget-cases", default="", help="cases run at the first budget only")
    ap.add_argument("--repeat-reference", action="store_true", help="time the GPU-resident references again at the end")
    ap.add_argument("--warmup-tokens", type=int, default=8, help="untimed GPU-resident warm-up (with and without SD)")
    ap.add_argument("--out", default="results/offload")
    return ap.parse_args()


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    full = reference_hardware(args.device)
    budgets = [load_preset("hardware", b, device=args.device, pace_pcie=args.pace_pcie)
               for b in args.budgets.split(",") if b]
    cfg = session_config(args, full)
    model = cfg.model
    bw = measure_bandwidth_gb_per_s(torch.device(args.device), torch.empty(2**28, dtype=torch.uint8, device=args.device), 2**28) if args.device == "cuda" else float("nan")
    t0 = time.perf_counter()
    session = open_session(cfg)
    build_s = time.perf_counter() - t0
    base: dict[str, dict] = {}

    def run(case: str, method: MethodConfig, hw, reference, summaries: dict, out_dir: Path) -> None:
        t = time.perf_counter()
        try:
            gens, plan, peak = session.generate(method, hw, args.max_new_tokens)
        except Exception as exc:  # one broken method must not cost the others' numbers
            log.exception("case %s failed", case)
            summaries[case] = {"case": case, "error": repr(exc)}
            return
        s = summarize_run(session, method, hw, gens, plan, peak, reference)
        s["case"], s["wall_s"], s["tokens"] = case, time.perf_counter() - t, [g.token_ids for g in gens]
        summaries[case] = s
        log.info("%s %s: tpot %.1f ms, %.1f s", hw.name, case, s["tpot_ms"], s["wall_s"])
        write_json_atomic(out_dir / "partial_runs.json", summaries)  # survives a kill mid-benchmark

    tables = []
    try:
        for warm in ("gpu_resident", "gpu_resident_sd"):  # CUDA/cuBLAS init and first-use costs stay out of the table
            session.generate(MethodConfig(name=warm), full, args.warmup_tokens, 1)
        run("gpu_resident", MethodConfig(name="gpu_resident"), full, None, base, out)
        reference = base["gpu_resident"]["tokens"]
        run("gpu_resident_sd", MethodConfig(name="gpu_resident_sd"), full, reference, base, out)
        (out / "partial_runs.json").unlink(missing_ok=True)
        for i, hw in enumerate(budgets):
            summaries = dict(base)
            cases = args.cases.split(",") + (args.first_budget_cases.split(",") if i == 0 else [])
            for case in [c for c in cases if c]:
                run(case, method_for(case, args.num_slots), hw, reference, summaries, out / hw.name)
            meta = {"model": args.model, "draft": args.draft, "weights": model.weights, "routing": args.routing,
                    "trace": args.trace if args.routing == "replay" else None,
                    "expert_noise": args.expert_noise if model.weights == "twin" else None, "k": args.k,
                    "dataset": session.cfg.dataset.name if args.routing == "model" else "replay", "prompts": args.num_prompts,
                    "max_new_tokens": args.max_new_tokens, "num_moe_layers": len(session.target.layout.moe_layers),
                    "pinned_gb_per_s": bw, "build_s": build_s, "budget": hw.name, "budget_gib": hw.gpu_budget_gib,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "pcie_paced_gb_per_s": hw.pcie_gb_per_s if hw.pace_pcie else None,
                    "note": f"{hw.name} budget ({hw.gpu_budget_gib} GiB) emulated on a larger GPU" + (
                        f" (PCIe paced to {hw.pcie_gb_per_s} GB/s)" if hw.pace_pcie else " (memory only, PCIe not paced)")}
            link_gb_per_s = hw.pcie_gb_per_s if hw.pace_pcie else bw  # the floor is the link the copies ran on
            tables.append(write_tables(out / hw.name, summaries, meta, link_gb_per_s))
        if args.repeat_reference:  # the references again, last: is their TPOT a first-run artefact?
            again: dict[str, dict] = {}
            for name in ("gpu_resident", "gpu_resident_sd"):
                run(name, MethodConfig(name=name), full, reference, again, out)
            write_json_atomic(out / "reference_end.json", {c: {"tpot_ms": s.get("tpot_ms"), "first_tpot_ms":
                              base[c]["tpot_ms"]} for c, s in again.items()})
            (out / "partial_runs.json").unlink(missing_ok=True)
    finally:
        session.close()
    for meta, df in tables:
        print(json.dumps(meta))
        print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


def write_tables(out: Path, summaries: dict[str, dict], meta: dict, bw: float) -> tuple[dict, pd.DataFrame]:
    compute = {False: summaries["gpu_resident"]["tpot_ms"], True: summaries["gpu_resident_sd"]["tpot_ms"]}
    sd_reference = summaries["gpu_resident_sd"]["tokens"]
    rows = []
    for case, s in summaries.items():
        if "error" in s:
            rows.append({"case": case, "error": s["error"]})
            continue
        sd = get_strategy(s["method"]).speculative
        per_tok = s["h2d_bytes_per_token"] or 0.0
        same = [sum(a == b for a, b in zip(t, r)) / len(r) for t, r in zip(s["tokens"], sd_reference)]
        rows.append({
            "case": case, "sd": sd, "tpot_ms": s["tpot_ms"], "acceptance": s["acceptance_rate"],
            "tau": s["mean_acceptance_length"], "hit_rate": s["expert_hit_rate"],
            "coverage": s.get("prefetch_coverage"), "waste": s.get("prefetch_waste"),
            "top1": s.get("predictor_top1_accuracy"), "recall": s.get("predictor_recall"),
            "h2d_gb_per_token": per_tok / 1e9, "h2d_gb_per_s": s["h2d_gb_per_s"], "num_slots": s["num_slots"],
            "runtime_eff": runtime_efficiency(s["tpot_ms"], per_tok, bw, compute[sd]) if per_tok else None,
            "policy_eff": s.get("policy_efficiency"), "peak_gib": (s["peak_gpu_bytes"] or 0) / GIB,
            "within_budget": s["within_budget"], "agree_ref": s["token_agreement"],
            "agree_sd_ref": sum(same) / len(same) if sd else None,
        })
    df = pd.DataFrame(rows)
    runs = {case: {k: v for k, v in s.items() if k != "tokens"} for case, s in summaries.items()}
    write_text_atomic(out / "main.csv", df.to_csv(index=False, float_format="%.4g"))
    write_text_atomic(out / "table.md", "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
                      + df.to_markdown(index=False, floatfmt=".4g") + "\n")
    write_json_atomic(out / "runs.json", runs)
    write_json_atomic(out / "meta.json", meta)
    (out / "partial_runs.json").unlink(missing_ok=True)
    return meta, df


if __name__ == "__main__":
    main()

"""
Offloading methods side by side (SP-MoE vs the baselines), each with and without SD, on one
loaded twinned pair under an emulated GPU budget.

    python -m experiments.bench_offload --model mixtral --draft mistral_7b --out results/offload      # GPU
    python -m experiments.bench_offload --model tiny --draft tiny --device cpu --num-slots 12 --out /tmp/o

For every method: TPOT, acceptance, hit rate, prefetch coverage / waste, predictor accuracy,
H2D bytes per token, and the two distance-to-the-limit ratios of DESIGN.md section 5:
runtime efficiency = TPOT / (H2D bytes per token / pinned bandwidth + compute), where compute is
the GPU-resident TPOT of the same decoding mode (SD or not) measured in the same process, and
policy efficiency = H2D bytes / Belady-oracle bytes for the run's own access sequence.
Writes `<out>/main.csv`, `<out>/table.md`, `<out>/runs.json`; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from analysis.oracle import runtime_efficiency
from experiments.bench_foundation import pinned_bandwidth_gb_per_s
from experiments.presets import load_preset
from experiments.runner import open_session, summarize_run
from spmoe.config import CutoffConfig, MethodConfig, RunConfig, SpecConfig, TwinConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.strategy import get_strategy

log = logging.getLogger("bench_offload")
GIB = 2**30
DEFAULT_CASES = ("lru_nosd,lru,spmoe,spmoe_lru,spmoe_all,spmoe_off,mixtral_offloading,mixtral_offloading_nosd,"
                 "moe_infinity,moe_infinity_nosd,adapmoe,adapmoe_nosd")


def method_for(case: str, num_slots: int | None) -> MethodConfig:
    """Case name -> method config (`spmoe_all` / `spmoe_off` / `spmoe_L<n>` are cutoff ablations)."""
    if case == "spmoe_lru":  # the paper's LRU cache instead of layer-distance eviction
        return MethodConfig(name="spmoe", num_slots=num_slots, eviction="lru", cutoff=CutoffConfig(mode="auto"))
    if case.startswith("spmoe_"):
        mode = case.split("_", 1)[1]
        cutoff = CutoffConfig(mode="fixed", layer=int(mode[1:])) if mode.startswith("L") else CutoffConfig(mode=mode)
        return MethodConfig(name="spmoe", num_slots=num_slots, eviction="layer_distance", cutoff=cutoff)
    if case == "spmoe":
        return MethodConfig(name="spmoe", num_slots=num_slots, eviction="layer_distance")
    return MethodConfig(name=case, num_slots=num_slots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--k", type=int, default=1)
    ap.add_argument("--expert-noise", type=float, default=0.02)
    ap.add_argument("--budget-hardware", default="rtx4090")
    ap.add_argument("--num-slots", type=int, default=None, help="cap the cache (CPU runs)")
    ap.add_argument("--cases", default=DEFAULT_CASES)
    ap.add_argument("--warmup-tokens", type=int, default=8, help="untimed GPU-resident warm-up (with and without SD)")
    ap.add_argument("--out", default="results/offload")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    full = load_preset("hardware", "h200" if args.device == "cuda" else "cpu", device=args.device)
    budget_hw = load_preset("hardware", args.budget_hardware, device=args.device)
    model = load_preset("model", args.model, weights="twin", twin=TwinConfig(expert_noise=args.expert_noise))
    cfg = RunConfig(model=model, draft=load_preset("draft", args.draft), dataset=load_preset("dataset", args.dataset),
                    method=MethodConfig(name="gpu_resident_sd"), hardware=full, spec=SpecConfig(num_draft_tokens=args.k),
                    max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts)
    bw = pinned_bandwidth_gb_per_s(torch.device(args.device)) if args.device == "cuda" else float("nan")
    t0 = time.perf_counter()
    session = open_session(cfg)
    build_s = time.perf_counter() - t0
    summaries: dict[str, dict] = {}

    def run(case: str, method: MethodConfig, hw, reference) -> None:
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
        log.info("%s: tpot %.1f ms, %.1f s", case, s["tpot_ms"], s["wall_s"])
        write_json_atomic(out / "partial_runs.json", summaries)  # survives a kill mid-benchmark

    try:
        for warm in ("gpu_resident", "gpu_resident_sd"):  # CUDA/cuBLAS init and first-use costs stay out of the table
            session.generate(MethodConfig(name=warm), full, args.warmup_tokens, 1)
        run("gpu_resident", MethodConfig(name="gpu_resident"), full, None)
        reference = summaries["gpu_resident"]["tokens"]
        run("gpu_resident_sd", MethodConfig(name="gpu_resident_sd"), full, reference)
        for case in [c for c in args.cases.split(",") if c]:
            run(case, method_for(case, args.num_slots), budget_hw, reference)
    finally:
        session.close()

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
        s.pop("tokens")
    df = pd.DataFrame(rows)
    meta = {"model": args.model, "draft": args.draft, "weights": "twin", "expert_noise": args.expert_noise,
            "k": args.k, "dataset": args.dataset, "prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens,
            "pinned_gb_per_s": bw, "build_s": build_s, "budget": args.budget_hardware,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "note": f"{args.budget_hardware} budget emulated on a larger GPU (memory only, PCIe not paced)"}
    write_text_atomic(out / "main.csv", df.to_csv(index=False, float_format="%.4g"))
    write_text_atomic(out / "table.md", "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
                      + df.to_markdown(index=False, floatfmt=".4g") + "\n")
    write_json_atomic(out / "runs.json", summaries)
    (out / "partial_runs.json").unlink(missing_ok=True)
    print(json.dumps(meta))
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()

"""
Speculative-decoding benchmark on a twinned pair (target MoE upcycled from its dense draft).

    python -m experiments.bench_spec --model mixtral --draft mistral_7b --out results/spec      # GPU
    python -m experiments.bench_spec --model tiny --draft tiny --device cpu --out results/spec_tiny

1. Twin sweep: for each `--noises` value the target is re-upcycled from the draft (experts =
   draft FFN + noise) and we measure acceptance and tau (k=1), the distinct-token ratio of the
   generated text, and the draft->target-router agreement (top-1 accuracy, set recall; mean over
   layers) at each capture point, teacher-forced on the reference output.
2. Main table at `--main-noise`: gpu_resident vs gpu_resident_sd for each k (all experts on the
   device), and lru_nosd vs lru (SD) at the `--budget-hardware` budget (emulated), with the
   draft counted against the budget for SD methods: TPOT, acceptance, tau, unique experts per
   layer per step, H2D bytes per token, hit rate.
Everything runs in one process on one loaded pair, so ratios are side by side. Random weights:
these are tests of the mechanisms, not headline numbers (see the distinct-token ratio).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch

from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.summary import summarize_run
from spmoe.config import MethodConfig, RunConfig, SpecConfig, TwinConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.models.twin import upcycle
from spmoe.predict.capture import (
    CAPTURE_POINTS,
    agreement,
    capture_hidden,
    capture_routes,
    predict_routes,
)
from spmoe.methods import get_strategy
from spmoe.strategy import MethodContext

log = logging.getLogger("bench_spec")
GIB = 2**30


@torch.inference_mode()
def router_agreement(session, sequences: list[list[int]], by_layer: dict | None = None,
                     ) -> dict[str, tuple[float, float]]:
    """capture point -> (top-1 accuracy, set recall), mean over MoE layers and sequences; `by_layer`,
    when given, is filled with (capture point, layer) -> [(top-1, recall) per sequence]."""
    layout = session.target.layout
    ctx = MethodContext(session.cfg, session.target, session.device, session.plan(
        load_preset("hardware", "h200", device=session.device.type), "gpu_resident"))
    runtime = get_strategy("gpu_resident").build(ctx)
    scores: dict[str, list[tuple[float, float]]] = {p: [] for p in CAPTURE_POINTS}
    try:
        for seq in sequences:
            ids = torch.tensor([seq], device=session.device)
            with capture_routes(runtime.model, layout.moe_layers) as routes:
                runtime.model(input_ids=ids, logits_to_keep=1)
            for point in CAPTURE_POINTS:
                with capture_hidden(session.draft, point) as hidden:
                    session.draft(input_ids=ids, logits_to_keep=1)
                for layer in layout.moe_layers:
                    pred = predict_routes(runtime.model, layer, hidden[layer])
                    scores[point].append(agreement(pred, routes[layer]))
                    if by_layer is not None:
                        by_layer.setdefault((point, layer), []).append(scores[point][-1])
    finally:
        runtime.close()
    return {p: (sum(s[0] for s in v) / len(v), sum(s[1] for s in v) / len(v)) for p, v in scores.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--offload-prompts", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--noises", default="0,0.05,0.2,0.5")
    ap.add_argument("--main-noise", type=float, default=0.05)
    ap.add_argument("--budget-hardware", default="rtx4090")
    ap.add_argument("--offload-slots", type=int, default=None, help="cap the offloaded runs' cache (CPU runs)")
    ap.add_argument("--out", default="results/spec")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ks = [int(k) for k in args.ks.split(",")]
    noises = [float(x) for x in args.noises.split(",")]
    out = Path(args.out)

    full = load_preset("hardware", "h200" if args.device == "cuda" else "cpu", device=args.device)
    budget_hw = load_preset("hardware", args.budget_hardware, device=args.device)
    model = load_preset("model", args.model, weights="twin", twin=TwinConfig(expert_noise=args.main_noise))
    cfg = RunConfig(model=model, draft=load_preset("draft", args.draft), dataset=load_preset("dataset", args.dataset),
                    method=MethodConfig(name="gpu_resident_sd"), hardware=full,
                    max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts)
    t0 = time.perf_counter()
    session = open_session(cfg)
    build_s = time.perf_counter() - t0
    layout = session.target.layout

    def retwin(noise: float) -> None:
        upcycle(session.target.model, layout, session.target.store, session.draft, TwinConfig(expert_noise=noise),
                cfg.seed)

    def run(method: str, hw, k: int, prompts: int, reference, **method_kw) -> dict:
        m = MethodConfig(name=method, **method_kw)
        spec = SpecConfig(num_draft_tokens=k)
        gens, plan, peak = session.generate(m, hw, args.max_new_tokens, prompts, spec_cfg=spec)
        s = summarize_run(session, m, hw, gens, plan, peak, reference, spec_cfg=spec)
        s["tokens"] = [g.token_ids for g in gens]
        return s

    sweep, summaries = [], {}
    try:
        for noise in noises:
            retwin(noise)
            ref = run("gpu_resident", full, 1, 1, None)
            sd = run("gpu_resident_sd", full, 1, 1, ref["tokens"])
            agree = router_agreement(session, [session.prompts[0].token_ids + ref["tokens"][0]])
            row = {"expert_noise": noise, "acceptance_rate": sd["acceptance_rate"],
                   "mean_acceptance_length": sd["mean_acceptance_length"],
                   "distinct_token_ratio": ref["distinct_token_ratio"], "sd_token_agreement": sd["token_agreement"]}
            for point, (top1, recall) in agree.items():
                row[f"top1_{point}"], row[f"recall_{point}"] = top1, recall
            sweep.append(row)
            log.info("sweep %s", row)

        retwin(args.main_noise)
        ref = run("gpu_resident", full, 1, args.num_prompts, None)
        reference = ref["tokens"]
        summaries["gpu_resident"] = ref
        for k in ks:
            summaries[f"gpu_resident_sd_k{k}"] = run("gpu_resident_sd", full, k, args.num_prompts, reference)
        slots = {"num_slots": args.offload_slots}
        summaries["lru_nosd"] = run("lru_nosd", budget_hw, 1, args.offload_prompts, reference, **slots)
        for k in ks:
            summaries[f"lru_k{k}"] = run("lru", budget_hw, k, args.offload_prompts, reference, **slots)
    finally:
        session.close()

    rows = []
    for case, s in summaries.items():
        rows.append({
            "case": case, "method": s["method"], "hardware": s["hardware"], "k": s["num_draft_tokens"],
            "prompts": s["num_prompts"], "tpot_ms": s["tpot_ms"], "acceptance_rate": s["acceptance_rate"],
            "tau": s["mean_acceptance_length"], "unique_experts_per_layer_step": s["unique_experts_per_layer_step"],
            "h2d_gb_per_token": (s["h2d_bytes_per_token"] or 0) / 1e9, "hit_rate": s["expert_hit_rate"],
            "num_slots": s["num_slots"], "stall_ms_per_token": s["stall_ms"] / max(s["num_generated_tokens"] - s["num_prompts"], 1),
            "peak_gib": (s["peak_gpu_bytes"] or 0) / GIB, "within_budget": s["within_budget"],
            "token_agreement": s["token_agreement"], "distinct_token_ratio": s["distinct_token_ratio"],
        })
    main_df, sweep_df = pd.DataFrame(rows), pd.DataFrame(sweep)
    base = {"gpu_resident": main_df.loc[main_df.case == "gpu_resident", "tpot_ms"].item(),
            "lru_nosd": main_df.loc[main_df.case == "lru_nosd", "tpot_ms"].item()}
    main_df["speedup_vs_nosd"] = [base["lru_nosd" if r.hardware == args.budget_hardware else "gpu_resident"] / r.tpot_ms
                                  for r in main_df.itertuples()]
    meta = {"model": args.model, "draft": args.draft, "weights": "twin", "main_expert_noise": args.main_noise,
            "dataset": args.dataset, "max_new_tokens": args.max_new_tokens, "build_s": build_s,
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "note": f"{args.budget_hardware} budget emulated (memory only, PCIe not paced); random twinned weights"}
    for s in summaries.values():
        s.pop("tokens")
    write_text_atomic(out / "main.csv", main_df.to_csv(index=False, float_format="%.4g"))
    write_text_atomic(out / "twin_sweep.csv", sweep_df.to_csv(index=False, float_format="%.4g"))
    md = ("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n## Twin sweep (k=1)\n\n"
          + sweep_df.to_markdown(index=False, floatfmt=".3g") + "\n\n## Main comparison\n\n"
          + main_df.to_markdown(index=False, floatfmt=".4g") + "\n")
    write_text_atomic(out / "table.md", md)
    write_json_atomic(out / "runs.json", summaries)
    print(json.dumps(meta))
    print(sweep_df.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    print(main_df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()

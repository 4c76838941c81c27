"""
The measurements behind spmoe_plus's parts that are not runs (the runs themselves, spmoe_plus against
the baselines and its ablations, are `python run.py -m experiment=spmoe_plus`):

    python -m experiments.bench_plus --host --model mixtral --device cuda --out results/spmoe_plus    # GPU
    python -m experiments.bench_plus --acceptance --model smollm2_moe --draft smollm2 --device cpu \
        --num-prompts 3 --max-new-tokens 48 --out results/spmoe_plus                                  # CPU

    python -m experiments.bench_plus --table <experiment run dir> --out results/spmoe_plus/<name>     # any

`--host`: the host's expert compute time (1, 2, 4 tokens) and the pinned copy bandwidth alone and while
the host computes (does host compute slow the copies?), `<out>/host.json`. `--acceptance`:
acceptance of the bf16 / int8 / int4 / auto drafts on a real pair and losslessness against the GPU-resident reference, `<out>/draft_acceptance.{csv,md}`.
`--table`: spmoe_plus's columns from a finished experiment's case summaries, `<out>/table.{csv,md}`:
TPOT (median over rounds) and its ratio to the best case of another method, GB and stall per
decoded token (prefill excluded, as the summary's keys), the host's share of expert computations and its in-run ms per expert (routed tokens: ms), lossy
loads and their GB (prefill included),
the lossless verdict with its token agreement, and `agree_plus` = agreement of the case's tokens
with the `spmoe_plus` case's (under replay both draft with the int8 draft at fixed k, so tokens
differ only where the target's verified token does).
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from pathlib import Path

import pandas as pd
import torch

from experiments.presets import load_preset
from spmoe.config import CutoffConfig, MethodConfig, PlusConfig, RunConfig, SpecConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.models.experts import expert_mlp
from spmoe.session import open_session
from spmoe.trace.metrics import summarize

log = logging.getLogger("bench_plus")
def host_profile(session, num_experts: int = 8) -> dict:
    """Host ms per expert (1, 2, 4 tokens) and pinned copy GB/s alone and while the host computes."""
    store, layout, device = session.target.store, session.target.layout, session.device
    act = session.target.model.model.layers[layout.moe_layers[0]].mlp.experts.act_fn
    keys = layout.keys[:num_experts]
    out = {"host_threads": torch.get_num_threads()}
    for n in (1, 2, 4):
        x = torch.randn(n, layout.hidden_size).to(layout.dtype)  # [n, H]
        expert_mlp(x, *layout.split(store.flat(keys[0])), act)
        t0 = time.perf_counter()
        for key in keys:
            expert_mlp(x, *layout.split(store.flat(key)), act)
        out[f"host_ms_per_expert_{n}tok"] = (time.perf_counter() - t0) * 1e3 / len(keys)
    if device.type != "cuda":
        return out
    dst = torch.empty(layout.expert_numel, dtype=layout.dtype, device=device)

    def copy_gb_per_s() -> float:
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(3):
            for key in keys:
                dst.copy_(store.flat(key), non_blocking=True)
        torch.cuda.synchronize(device)
        return 3 * len(keys) * layout.expert_bytes / (time.perf_counter() - t0) / 1e9

    out["copy_gb_per_s_alone"] = copy_gb_per_s()
    stop, done = threading.Event(), []
    x = torch.randn(2, layout.hidden_size).to(layout.dtype)

    def host_loop() -> None:
        while not stop.is_set():
            for key in keys[len(keys) // 2:]:  # other experts than the copies read: no shared cache lines
                expert_mlp(x, *layout.split(store.flat(key)), act)
                done.append(1)

    worker = threading.Thread(target=host_loop)
    worker.start()
    time.sleep(0.05)
    out["copy_gb_per_s_with_host"] = copy_gb_per_s()
    stop.set()
    worker.join()
    out["host_experts_during_copies"] = len(done)
    return out


def draft_acceptance(args: argparse.Namespace) -> None:
    """Acceptance of the quantized drafts on a pair whose draft really predicts its target (CPU):
    spmoe_plus with only the draft precision changed, against the GPU-resident reference."""
    cfg = RunConfig(model=load_preset("model", args.model), draft=load_preset("draft", args.draft),
                    dataset=load_preset("dataset", args.dataset), method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", "cpu"), max_new_tokens=args.max_new_tokens,
                    num_prompts=args.num_prompts)
    session = open_session(cfg)
    rows = []
    try:
        ref = [g.token_ids for g in session.generate(cfg.method, cfg.hardware, args.max_new_tokens)[0]]
        for k in (1, 3):
            for precision in ("bf16", "int8", "int4", "auto"):
                method = MethodConfig(name="spmoe_plus", eviction="layer_distance", cutoff=CutoffConfig(mode="off"),
                                      plus=PlusConfig(draft_precision=precision, host_compute="off"))
                gens, _, _ = session.generate(method, cfg.hardware, args.max_new_tokens,
                                              spec_cfg=SpecConfig(num_draft_tokens=k))
                m, extra = summarize([g.records for g in gens]), session.last_extra
                rows.append({"k": k, "precision": precision, "chosen": extra["draft_precision"],
                             "acceptance": m["acceptance_rate"], "tau": m["mean_acceptance_length"],
                             "lossless": [g.token_ids for g in gens] == ref,
                             "calibration_agreement": extra["draft_agreement"],
                             "auto_tried": extra.get("draft_agreement_tried"),
                             "draft_saved_bytes": extra["draft_saved_bytes"]})
                log.info("%s", rows[-1])
    finally:
        session.close()
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out / "draft_acceptance.csv", df.to_csv(index=False, float_format="%.4g"))
    head = (f"- pair: model={args.model} draft={args.draft} (CPU float32), dataset {args.dataset}, {args.num_prompts}"
            f" prompts x {args.max_new_tokens} tokens, greedy; spmoe_plus with only the draft precision changed"
            f" (bf16 = the draft as loaded, unquantized; auto: cheapest with calibration agreement >= 0.95)\n"
            f"- lossless: tokens equal to the GPU-resident reference (exact)\n\n")
    write_text_atomic(out / "draft_acceptance.md", head + df.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(df.to_string(index=False))


def host(args: argparse.Namespace) -> None:
    cfg = RunConfig(model=load_preset("model", args.model, weights="random"), dataset=load_preset("dataset", "synthetic"),
                    method=MethodConfig(name="gpu_resident"),
                    hardware=load_preset("hardware", "h200" if args.device == "cuda" else "cpu", device=args.device),
                    max_new_tokens=1, num_prompts=1)
    session = open_session(cfg)
    try:
        out = host_profile(session)
    finally:
        session.close()
    write_json_atomic(Path(args.out) / "host.json", out)
    print(json.dumps(out))


def _agreement(a: list[int], b: list[int]) -> float:
    return sum(x == y for x, y in zip(a, b)) / max(1, len(b))


def table(args: argparse.Namespace) -> None:
    root, rows = Path(args.table), []
    summaries = {p.parent.name: json.loads(p.read_text()) for p in sorted(root.glob("*/summary.json"))}
    tokens = {name: [json.loads(line)["token_ids"] for line in (root / name / "generations.jsonl").read_text().splitlines()]
              for name in summaries if (root / name / "generations.jsonl").is_file()}
    others = [s["tpot_ms_median"] for s in summaries.values() if s["method"] != "spmoe_plus"]
    best = min(others) if others else None
    for name, s in summaries.items():
        decode_tokens = max(1, s["num_generated_tokens"] - s["num_prompts"])  # the summary's per-token keys' unit
        ref = tokens.get("spmoe_plus")
        rows.append({
            "case": name, "method": s["method"], "tpot_ms": s["tpot_ms_median"],
            "rounds": " ".join(f"{t:.1f}" for t in s["tpot_ms_rounds"]), "spread": s["tpot_spread"],
            "vs_best_other": s["tpot_ms_median"] / best if best else None,
            "gb_per_token": s["h2d_bytes_per_token"] / 1e9, "slots": s["num_slots"], "hit_rate": s["expert_hit_rate"],
            "stall_ms_per_token": s["stall_ms"] / decode_tokens, "host_frac": s.get("host_expert_fraction"),
            "host_ms_in_run": " ".join(f"{n}:{ms:.2f}" for n, ms in (s.get("host_ms_in_run") or {}).items()) or None,
            "host_cost_fixed_ms": s.get("host_cost_fixed_ms"),
            "lossy_loads": s.get("lossy_loads"), "lossy_gb": (s["lossy_load_bytes"] / 1e9 if s.get("lossy_load_bytes")
                                                             is not None else None),
            "lossless": s["lossless"], "token_agreement": s.get("token_agreement"),
            "agree_plus": (sum(_agreement(a, b) for a, b in zip(tokens[name], ref)) / len(ref)
                           if ref and name in tokens else None),
            "peak_gib": s["peak_gpu_bytes"] / 2**30 if s.get("peak_gpu_bytes") else None,
            "within_budget": s.get("within_budget"),
        })
    errors = {p.parent.name: json.loads(p.read_text())["error"] for p in sorted(root.glob("*/error.json"))}
    df = pd.DataFrame(rows).sort_values("tpot_ms")
    out = Path(args.out)
    first = summaries.get("spmoe_plus") or next(iter(summaries.values()))
    head = "".join(f"- {k}: {first.get(k)}\n" for k in ("model", "draft", "routing", "hardware", "hardware_emulated",
                                                        "gpu_budget_bytes", "pcie_paced_gb_per_s", "device",
                                                        "num_draft_tokens", "max_new_tokens", "num_prompts", "rounds"))
    head += "".join(f"- failed case {k}: {v}\n" for k, v in errors.items())
    write_text_atomic(out / "table.csv", df.to_csv(index=False, float_format="%.4g"))
    write_text_atomic(out / "table.md", head + "\n" + df.to_markdown(index=False, floatfmt=".4g") + "\n")
    print(df.to_string(index=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--host", action="store_true", help="host expert time and copies with host compute")
    mode.add_argument("--acceptance", action="store_true", help="the quantized drafts' acceptance (CPU)")
    mode.add_argument("--table", metavar="RUN_DIR", help="spmoe_plus's table from a finished experiment's run dir")
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--draft", default="mistral_7b")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-prompts", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--layers", type=int, default=32, help="--sim: MoE layers the trace is mapped onto")
    ap.add_argument("--sim-slots", default="21,40,49,69,88")
    ap.add_argument("--sim-policies", default="lru,layer_distance,expected_reuse,sd_lookahead")
    ap.add_argument("--out", default="results/spmoe_plus")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.host:
        host(args)
    elif args.table:
        table(args)
    else:
        draft_acceptance(args)


if __name__ == "__main__":
    main()

"""
spmoe_plus against the best baselines, with and without SD, in interleaved rounds on one loaded
session, plus its ablations (each part switched off alone) and two measurements behind its parts:
the host's expert compute time and whether it slows the copies, and eviction policies against
Belady offline on recorded routing.

    python -m experiments.bench_plus --routing replay --out results/spmoe_plus                       # GPU
    python -m experiments.bench_plus --sim --out results/spmoe_plus/eviction_sim                     # CPU
    python -m experiments.bench_plus --acceptance --model smollm2_moe --draft smollm2 --device cpu \
        --num-prompts 3 --max-new-tokens 48 --out results/spmoe_plus                                 # CPU
    python -m experiments.bench_plus --model tiny --draft tiny --device cpu --routing replay \
        --budgets cpu --num-slots 12 --max-new-tokens 8 --rounds 1 --out /tmp/plus                  # smoke

Cases: baseline method names (`lru_nosd`, `moe_infinity_nosd`, `spmoe`, ...), `spmoe_plus`, and
ablations `plus_<part>` = spmoe_plus with one part off or changed (`PLUS_CASES`). Rounds run the
cases in order, then reversed (A B C C B A ...). Each case's row: median TPOT over rounds and the
spread (max - min) / median, its ratio to the best baseline's median, and from its median round the
bytes per emitted token, slots, hit rate, stall per token, host/GPU expert split, mean chosen k,
draft precision, policy efficiency. No GPU-resident reference is run (replayed tokens are not
text); `agree_spmoe` = token agreement with the `spmoe` case of the same round (host bf16
arithmetic vs GPU changes near-tie argmaxes of the random-weight replay model).
Writes `<out>/<budget>/{main.csv,table.md,runs.json,host.json}`; `--sim` writes
`<out>/eviction.{csv,md}`; `--acceptance` (acceptance of the bf16 / int8 / int4 / auto drafts on a
real pair, and losslessness against the GPU-resident reference) `<out>/draft_acceptance.{csv,md}`. Budgets are emulated (memory; PCIe only with --pace-pcie).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import threading
import time
from pathlib import Path

import pandas as pd
import torch

from experiments.bench_offload import add_session_args, method_for, session_config, reference_hardware
from experiments.presets import load_preset
from spmoe.config import CutoffConfig, MethodConfig, PlusConfig, RunConfig, SpecConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.methods import get_strategy
from spmoe.models.experts import expert_mlp
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction import make_policy
from spmoe.session import open_session
from spmoe.summary import summarize_run
from spmoe.trace.metrics import summarize
from spmoe.trace.oracle import belady_misses
from spmoe.trace.replay import map_layer
from spmoe.trace.routing import RoutingTrace, load_trace

log = logging.getLogger("bench_plus")
GIB = 2**30
PLUS_CASES = {  # ablations: spmoe_plus with one part off or changed
    "plus_bf16": {"draft_precision": "bf16"},
    "plus_int4": {"draft_precision": "int4"},
    "plus_nohost": {"host_compute": "off"},
    "plus_adaptk": {"adaptive_k": True},  # the union-aware k chooser on (off by default)
    "plus_ld": "layer_distance",  # spmoe's eviction instead of sd_lookahead
}


def plus_method(case: str, num_slots: int | None) -> MethodConfig:
    preset = load_preset("method", "spmoe_plus", num_slots=num_slots)
    change = PLUS_CASES.get(case, {})
    if isinstance(change, str):
        preset.eviction = change
    else:
        preset.plus = PlusConfig(**{**vars(preset.plus), **change})
    return preset


def case_method(case: str, num_slots: int | None) -> MethodConfig:
    return plus_method(case, num_slots) if case == "spmoe_plus" or case in PLUS_CASES else method_for(case, num_slots)


# -- host compute vs copies ----------------------------------------------------------------------

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


# -- the benchmark -------------------------------------------------------------------------------

def run_rounds(session, cases: list[str], hw, args, out: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for r in range(args.rounds):
        for case in (cases if r % 2 == 0 else cases[::-1]):
            method = case_method(case, args.num_slots)
            t = time.perf_counter()
            try:
                gens, plan, peak = session.generate(method, hw, args.max_new_tokens)
            except Exception as exc:  # one broken case must not cost the others' numbers
                log.exception("case %s failed", case)
                runs[case].append({"case": case, "error": repr(exc)})
                continue
            s = summarize_run(session, method, hw, gens, plan, peak, None)
            s.update(case=case, round=r, wall_s=time.perf_counter() - t, tokens=[g.token_ids for g in gens],
                     chosen_k=[rec.num_drafted for g in gens for rec in g.records if rec.phase == "decode"])
            runs[case].append(s)
            log.info("%s round %d %s: tpot %.1f ms, %d slots, %.1f s", hw.name, r, case, s["tpot_ms"], s["num_slots"],
                     s["wall_s"])
            write_json_atomic(out / "partial_runs.json", {c: [{k: v for k, v in x.items() if k != "tokens"} for x in xs]
                                                          for c, xs in runs.items()})  # survives a kill mid-benchmark
    return runs


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    same = sum(x == y for ta, tb in zip(a, b) for x, y in zip(ta, tb))
    return same / max(1, sum(len(t) for t in b))


def table(runs: dict[str, list[dict]]) -> pd.DataFrame:
    ok = {c: [s for s in rs if "error" not in s] for c, rs in runs.items()}
    medians = {c: statistics.median(s["tpot_ms"] for s in rs) for c, rs in ok.items() if rs}
    baselines = [c for c in medians if c != "spmoe_plus" and c not in PLUS_CASES]
    best = min(baselines, key=medians.__getitem__) if baselines else None
    spmoe = {s["round"]: s["tokens"] for s in ok.get("spmoe", [])}
    rows = []
    for case, rs in ok.items():
        if not rs:
            rows.append({"case": case, "error": runs[case][0]["error"]})
            continue
        tpots = [s["tpot_ms"] for s in rs]
        med = sorted(rs, key=lambda s: s["tpot_ms"])[len(rs) // 2]
        tokens = med["num_generated_tokens"] - med["num_prompts"]
        rows.append({
            "case": case, "sd": get_strategy(med["method"]).speculative, "tpot_ms": medians[case],
            "spread": (max(tpots) - min(tpots)) / medians[case], "rounds": " ".join(f"{t:.1f}" for t in tpots),
            "vs_best_baseline": medians[case] / medians[best] if best else None,
            "gb_per_token": (med["h2d_bytes_per_token"] or 0) / 1e9, "slots": med["num_slots"],
            "hit_rate": med["expert_hit_rate"], "stall_ms_per_token": med["stall_ms"] / max(1, tokens),
            "host_frac": med.get("host_expert_fraction"), "k_mean": med.get("chosen_k_mean"),
            "draft": med.get("draft_precision", "bf16" if med["draft"] else None),
            "policy_eff": med.get("policy_efficiency"), "acceptance": med["acceptance_rate"],
            "peak_gib": (med["peak_gpu_bytes"] or 0) / GIB, "within_budget": med["within_budget"],
            "agree_spmoe": _agreement(med["tokens"], spmoe[med["round"]]) if med["round"] in spmoe else None,
        })
    return pd.DataFrame(rows)


def bench(args: argparse.Namespace) -> None:
    out = Path(args.out)
    cfg = session_config(args, reference_hardware(args.device))
    budgets = [load_preset("hardware", b, device=args.device, pace_pcie=args.pace_pcie) for b in args.budgets.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    session = open_session(cfg)
    try:
        host = host_profile(session)
        log.info("host profile: %s", host)
        warm = budgets[0]
        for case in ("lru", "spmoe_plus"):  # CUDA/cuBLAS first-use and host-thread start-up stay out of the table
            try:
                session.generate(case_method(case, args.num_slots), warm, min(4, args.max_new_tokens), 1)
            except Exception:  # the case's own rounds record the error
                log.exception("warm-up of %s failed", case)
        for hw in budgets:
            runs = run_rounds(session, cases, hw, args, out / hw.name)
            df = table(runs)
            meta = {"model": args.model, "draft": args.draft, "routing": args.routing,
                    "trace": args.trace if args.routing == "replay" else None, "k": args.k,
                    "prompts": args.num_prompts, "max_new_tokens": args.max_new_tokens, "rounds": args.rounds,
                    "budget": hw.name, "budget_gib": hw.gpu_budget_gib,
                    "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                    "pcie_paced_gb_per_s": hw.pcie_gb_per_s if hw.pace_pcie else None,
                    "note": f"{hw.name} budget ({hw.gpu_budget_gib} GiB) EMULATED on a larger GPU" + (
                        f", PCIe paced to {hw.pcie_gb_per_s} GB/s" if hw.pace_pcie else ", PCIe not paced"),
                    "host": host}
            d = out / hw.name
            write_text_atomic(d / "main.csv", df.to_csv(index=False, float_format="%.4g"))
            write_text_atomic(d / "table.md", "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n"
                              + df.to_markdown(index=False, floatfmt=".4g") + "\n")
            write_json_atomic(d / "runs.json", {c: [{k: v for k, v in s.items() if k != "tokens"} for s in rs]
                                                for c, rs in runs.items()})
            write_json_atomic(d / "host.json", host)
            (d / "partial_runs.json").unlink(missing_ok=True)
            print(json.dumps({k: v for k, v in meta.items() if k != "host"}))
            print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    finally:
        session.close()


# -- eviction offline ----------------------------------------------------------------------------

def hinted_accesses(trace: RoutingTrace, num_layers: int) -> list[tuple]:
    """Run order of ('hint', row, layer, predicted ids) and ('access', key, counted): per verify row,
    the draft's predictions at every layer (as the draft runs), then the row's demand accesses (the
    sorted union per layer, as `experiments.eviction_sim.demand_accesses` with SD)."""
    pos, draft0 = trace.row_starts()
    layer_of = [map_layer(l, num_layers, trace.num_layers) for l in range(num_layers)]
    out = []
    for row in range(len(trace.row_step)):
        start, counted = int(pos[row]), bool(trace.row_step[row] > 0)
        for j in range(int(trace.row_drafted[row])):
            for l, src in enumerate(layer_of):
                out.append(("hint", row, l, [int(e) for e in trace.predicted[draft0[row] + j, src] if e >= 0]))
        routes = trace.routes[start:start + int(trace.row_positions[row])]  # [T, L_t, A]
        for l, src in enumerate(layer_of):
            ids = sorted({int(e) for e in routes[:, src].flatten() if 0 <= e < trace.num_experts})
            out.extend(("access", (l, e), counted) for e in ids)
    return out


def simulate(items: list[tuple], num_slots: int, policy: str, num_layers: int) -> int:
    cache = ExpertCache(num_slots, 1, torch.float32, "cpu", make_policy(policy, range(num_layers)))
    predict = getattr(cache.policy, "predict", None)
    misses = 0
    for item in items:
        if item[0] == "hint":
            if predict is not None:
                predict(item[1], item[2], item[3])
        elif cache.lookup(item[1]) is None:
            cache.admit(item[1])
            misses += item[2]
    return misses


def eviction_sim(args: argparse.Namespace) -> None:
    trace = load_trace(args.trace)
    items = hinted_accesses(trace, args.layers)
    accesses = [(it[1], it[2]) for it in items if it[0] == "access"]
    rows = []
    for slots in [int(s) for s in args.sim_slots.split(",")]:
        oracle = belady_misses(accesses, slots)
        for policy in args.sim_policies.split(","):
            misses = simulate(items, slots, policy, args.layers)
            rows.append({"slots": slots, "policy": policy, "misses": misses, "oracle": oracle,
                         "policy_eff": misses / oracle})
    df = pd.DataFrame(rows)
    wide = df.pivot(index="policy", columns="slots", values="policy_eff").reindex(args.sim_policies.split(","))
    out = Path(args.out)
    write_text_atomic(out / "eviction.csv", df.to_csv(index=False, float_format="%.4g"))
    head = (f"- trace: {args.trace} (k={trace.meta.get('spec_k')}, {trace.num_prompts} prompts) on {args.layers} MoE"
            f" layers; SD demand accesses, sd_lookahead also sees the draft's predictions of each verify row\n"
            f"- cells: policy efficiency = misses / Belady misses; columns: expert slots (24 GiB: bf16 draft 21, int8"
            f" 40, int4 49; 40 GiB: bf16 69, int8 88)\n\n")
    write_text_atomic(out / "eviction.md", head + wide.to_markdown(floatfmt=".3f") + "\n")
    print(wide.to_string(float_format=lambda x: f"{x:.3f}"))


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_args(ap)
    ap.add_argument("--budgets", default="rtx4090", help="hardware presets, comma-separated")
    ap.add_argument("--num-slots", type=int, default=None, help="cap the cache (CPU runs)")
    ap.add_argument("--pace-pcie", action="store_true")
    ap.add_argument("--cases", default="lru_nosd,moe_infinity_nosd,spmoe,spmoe_plus")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sim", action="store_true", help="only the offline eviction simulation (CPU)")
    ap.add_argument("--acceptance", action="store_true", help="only the quantized drafts' acceptance (CPU)")
    ap.add_argument("--layers", type=int, default=32, help="--sim: MoE layers the trace is mapped onto")
    ap.add_argument("--sim-slots", default="21,40,49,69,88")
    ap.add_argument("--sim-policies", default="lru,layer_distance,expected_reuse,sd_lookahead")
    ap.add_argument("--out", default="results/spmoe_plus")
    ap.set_defaults(max_new_tokens=32)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.sim:
        eviction_sim(args)
    elif args.acceptance:
        draft_acceptance(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()

"""
Where a method's decode time goes, and whether two methods really differ: cases timed in
interleaved rounds (A B A B ...) in one process, then each profiled once with cProfile.

    python -m experiments.profile_decode --model deepseek_v2_lite --draft int8_self \
        --budget rtx4090 --cases spmoe,spmoe_noworker --rounds 3 --out results/profile_deepseek

Interleaving spreads slow drifts of the machine (clocks, a noisy neighbour) over every case, so
the per-case median and spread say how much of a difference is noise. The profile (cumulative
and own time of the top functions, the decode thread's view) shows how much of TPOT is Python
on the host. Writes `<out>/timing.csv`, `<out>/summary.md` and `<out>/profile_<case>.txt`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
from pathlib import Path

import pandas as pd

from experiments.bench_offload import add_session_args, method_for, reference_hardware, session_config
from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.summary import summarize_run
from spmoe.config import MethodConfig
from spmoe.io import write_text_atomic

log = logging.getLogger("profile_decode")


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_session_args(ap)
    ap.add_argument("--budget", default="rtx4090", help="hardware preset the offloading cases run under")
    ap.add_argument("--cases", default="gpu_resident,lru,spmoe,spmoe_noworker")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile-tokens", type=int, default=32, help="tokens per profiled run (0: no profile)")
    ap.add_argument("--out", default="results/profile")
    return ap.parse_args()


def main() -> None:
    args = _args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    full, budget = reference_hardware(args.device), load_preset("hardware", args.budget, device=args.device)
    out = Path(args.out)
    session = open_session(session_config(args, full))
    cases = [c for c in args.cases.split(",") if c]
    hw_of = {c: full if c.startswith("gpu_resident") else budget for c in cases}
    method_of = {c: MethodConfig(name=c) if c.startswith("gpu_resident") else method_for(c, None) for c in cases}
    rows = []
    try:
        for warm in ("gpu_resident", "gpu_resident_sd"):
            session.generate(MethodConfig(name=warm), full, 8, 1)
        for r in range(args.rounds):
            for case in cases if r % 2 == 0 else cases[::-1]:
                gens, plan, peak = session.generate(method_of[case], hw_of[case], args.max_new_tokens)
                s = summarize_run(session, method_of[case], hw_of[case], gens, plan, peak, None)
                rows.append({"case": case, "round": r, "tpot_ms": s["tpot_ms"], "stall_ms": s["stall_ms"],
                             "h2d_bytes_per_token": s["h2d_bytes_per_token"]})
                log.info("round %d %s: tpot %.1f ms", r, case, s["tpot_ms"])
        for case in cases if args.profile_tokens else []:
            prof = cProfile.Profile()
            prof.enable()
            session.generate(method_of[case], hw_of[case], args.profile_tokens)
            prof.disable()
            text = io.StringIO()
            stats = pstats.Stats(prof, stream=text).strip_dirs()
            stats.sort_stats("cumulative").print_stats(25)
            stats.sort_stats("tottime").print_stats(25)
            write_text_atomic(out / f"profile_{case}.txt", text.getvalue())
    finally:
        session.close()
    df = pd.DataFrame(rows)
    write_text_atomic(out / "timing.csv", df.to_csv(index=False, float_format="%.4g"))
    agg = df.groupby("case", sort=False)["tpot_ms"].agg(["median", "min", "max", "count"]).reset_index()
    write_text_atomic(out / "summary.md", f"- budget: {args.budget}, model: {args.model}, draft: {args.draft},"
                      f" routing: {args.routing}, tokens: {args.max_new_tokens}, rounds: {args.rounds}"
                      f" (interleaved)\n\n" + agg.to_markdown(index=False, floatfmt=".1f") + "\n")
    print(agg.to_string(index=False, float_format=lambda x: f"{x:.1f}"))


if __name__ == "__main__":
    main()

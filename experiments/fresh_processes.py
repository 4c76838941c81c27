"""
One configuration in N fresh processes: how far apart their TPOTs land (run-to-run stability).

    python -m experiments.fresh_processes --n 3 --out results/runtime/fresh -- \
        model=deepseek_v2_lite method=gpu_resident draft=none hardware=h200 hardware.decode=graphs

Runs `python run.py <overrides> hydra.run.dir=<out>/proc_<i>` N times, one after another (each a
new interpreter: new allocator, new graph captures, new kernel autotuning), reads each run's
`summary.json`, and reports TPOT, its within-run spread, host ms per step, and across processes
spread = (max - min) / min of the TPOTs. Writes `fresh.csv` and `table.md` under --out and prints
the table last. A process that fails stops the script with its exit status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEYS = ("tpot_ms", "tpot_spread", "tpot_prompt_spread", "host_ms_per_step", "lossless", "decode", "expert_kernel")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=3)
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="+", help="run.py overrides (after --)")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(args.n):
        run_dir = out / f"proc_{i}"
        cmd = [sys.executable, str(ROOT / "run.py"), *args.overrides, f"hydra.run.dir={run_dir}"]
        done = subprocess.run(cmd, cwd=ROOT)
        if done.returncode:
            raise SystemExit(done.returncode)
        summary = json.loads((run_dir / "summary.json").read_text())
        rows.append({"process": i, **{k: summary.get(k) for k in KEYS}})
    tpots = [r["tpot_ms"] for r in rows]
    spread = (max(tpots) - min(tpots)) / min(tpots)
    (out / "fresh.csv").write_text("\n".join([",".join(("process", *KEYS))] + [
        ",".join(str(r[k]) for k in ("process", *KEYS)) for r in rows]) + "\n")
    lines = [f"`python run.py {' '.join(args.overrides)}` in {args.n} fresh processes:", "",
             "| process | TPOT ms | spread over rounds | spread over prompts | host ms/step | lossless |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['process']} | {r['tpot_ms']:.2f} | {r['tpot_spread']:.3f} | {r['tpot_prompt_spread']:.3f}"
              f" | {r['host_ms_per_step']:.2f} | {r['lossless']} |" for r in rows]
    lines += ["", f"Across processes: (max - min) / min = {spread:.1%}"]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""
Wall-clock of one Hydra sweep run in parallel (one GPU per job) against the same sweep run job after job.

    python -m experiments.parallel_sweep --out <dir> [--gpus 2] -- experiment=fig11_memory \
        hardware.gpu_budget_gib=24,39

runs `python run.py -m <overrides>` twice, first with `hydra/launcher=gpus hydra/callbacks=one_gpu_per_job`
(joblib workers, `--gpus` at once) into `<dir>/parallel`, then with Hydra's basic launcher (one process, jobs in
order) into `<dir>/sequential`, so both sweeps do identical work in fresh sweep dirs (nothing is resumed).
While each runs, `nvidia-smi` is sampled every second (`<dir>/<mode>_gpus.csv`: per GPU, memory used and
utilization), which shows whether the jobs really ran on different GPUs at the same time.
Writes `<dir>/timing.csv` and `<dir>/timing.md`: wall seconds per mode, jobs finished, the speedup, and per GPU
the seconds it was busy (utilization > 0).
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "parallel": ["hydra/launcher=gpus", "hydra/callbacks=one_gpu_per_job"],
    "sequential": [],
}


def _sample_gpus(path: Path) -> subprocess.Popen | None:
    if shutil.which("nvidia-smi") is None:
        return None
    out = path.open("w")
    return subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,index,memory.used,utilization.gpu",
                             "--format=csv,noheader,nounits", "-l", "1"], stdout=out, stderr=subprocess.DEVNULL)


def _busy_s(path: Path) -> dict[str, int]:
    """Seconds each GPU showed utilization > 0 (one sample per second)."""
    busy: dict[str, int] = {}
    if not path.exists():
        return busy
    for row in csv.reader(path.open()):
        if len(row) == 4 and row[3].strip().isdigit():
            gpu = row[1].strip()
            busy[gpu] = busy.get(gpu, 0) + (int(row[3]) > 0)
    return busy


def run_mode(mode: str, overrides: list[str], out: Path, gpus: int) -> dict:
    sweep_dir = out / mode
    cmd = [sys.executable, "run.py", "-m", *MODES[mode], *overrides, f"hydra.sweep.dir={sweep_dir}"]
    env = dict(os.environ, SPMOE_NUM_GPUS=str(gpus))
    sampler = _sample_gpus(out / f"{mode}_gpus.csv")
    t0 = time.perf_counter()
    with (out / f"{mode}.log").open("w") as log:
        rc = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall_s = time.perf_counter() - t0
    if sampler is not None:
        sampler.terminate()
        sampler.wait()
    jobs = sum(1 for p in sweep_dir.glob("*") if p.is_dir() and any(p.glob("**/summary.json")))
    busy = _busy_s(out / f"{mode}_gpus.csv")
    return {"mode": mode, "wall_s": round(wall_s, 1), "rc": rc, "jobs_with_results": jobs,
            "gpu_busy_s": ";".join(f"gpu{g}:{s}" for g, s in sorted(busy.items())), "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--modes", default="parallel,sequential")
    parser.add_argument("overrides", nargs="+", help="the sweep's overrides (after --)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        rows.append(run_mode(mode, args.overrides, args.out, args.gpus))
        write_timing(rows, args.out)  # after each mode, so a cut-off second mode leaves the first's numbers


def write_timing(rows: list[dict], out: Path) -> None:
    with (out / "timing.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| mode | wall s | jobs with results | exit | GPU busy s |", "|---|---|---|---|---|"]
    lines += [f"| {r['mode']} | {r['wall_s']} | {r['jobs_with_results']} | {r['rc']} | {r['gpu_busy_s']} |"
              for r in rows]
    walls = {r["mode"]: r["wall_s"] for r in rows}
    if {"parallel", "sequential"} <= walls.keys():
        lines.append(f"\nspeedup (sequential / parallel): {walls['sequential'] / walls['parallel']:.2f}x")
    (out / "timing.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

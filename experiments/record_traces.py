"""
Record the real small pair's routing traces that `routing=replay` replays, and describe them.

    python -m spmoe.models.real_pair                        # build the pair once (CPU)
    python -m experiments.record_traces                     # every trace, then the README
    python -m experiments.record_traces --only gsm8k_k1     # some of them
    python -m experiments.record_traces --readme-only       # the README from the committed files

A *trace* `<dataset>_k<k>.npz` is one `run.py` run of SP-MoE on the real pair (target
`smollm2_moe`, draft `smollm2`) with every layer predicted (`method.cutoff.mode=all`, so every
MoE layer has a draft-side prediction), `trace.routing=true`, 10 prompts, 100 new tokens, greedy
SD with k draft tokens, on the CPU; the run's `routing_trace.npz` is copied to
`results/real_pair/traces/`. Each run goes through `run.py` as a user would type it, so the
recording is the command printed in the README.

Statistics in the README are computed from each trace file, not from the run's summary:
- acceptance = accepted drafts / drafted tokens over all verify rows; tau = 1 + accepted / verify rows
  (mean tokens per verify step, bonus token included);
- predictor top-1 = fraction of (draft token, MoE layer) pairs whose predicted first expert is the
  expert the target routed first at that verify position (`predicted[d, l, 0] == routes[p, l, 0]`).
  The run's `predictor_top1_accuracy` counts only predictions that reached the prefetcher before
  verification did, so it can differ from this in the third decimal.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from spmoe.config import DatasetConfig
from spmoe.data.prompts import load_prompts
from spmoe.data.tokenizer import ByteTokenizer
from spmoe.io import write_text_atomic
from spmoe.models.real_pair import PairConfig
from spmoe.trace.routing import RoutingTrace, load_trace

log = logging.getLogger("record_traces")

ROOT = Path(__file__).resolve().parent.parent
TRACE_DIR = ROOT / "results" / "real_pair" / "traces"
DATASETS = ("humaneval", "gsm8k", "mtbench", "sharegpt")
DRAFT_LENGTHS = (1, 3, 5, 7)
NUM_PROMPTS, MAX_NEW_TOKENS = 10, 100
MAX_TRACE_BYTES = 1 << 20
RECORD_OVERRIDES = ("model=smollm2_moe", "draft=smollm2", "method=spmoe", "method.cutoff.mode=all",
                    "trace.routing=true", f"max_new_tokens={MAX_NEW_TOKENS}", f"num_prompts={NUM_PROMPTS}",
                    "check_lossless=false", "hardware=cpu", "routing=model", "dataset.chat_template=false")


@dataclass(frozen=True)
class TraceSpec:
    dataset: str
    k: int  # draft tokens per verify step

    @property
    def name(self) -> str:
        return f"{self.dataset}_k{self.k}"

    def overrides(self) -> list[str]:
        return [*RECORD_OVERRIDES[:3], f"dataset={self.dataset}", *RECORD_OVERRIDES[3:],
                f"spec.num_draft_tokens={self.k}"]

    def command(self) -> str:
        return "python run.py " + " ".join(self.overrides())


ALL_TRACES = tuple(TraceSpec(d, k) for d in DATASETS for k in DRAFT_LENGTHS)


def trace_stats(trace: RoutingTrace) -> dict:
    """Counts, acceptance and predictor top-1 of one trace (definitions in the module docstring)."""
    verify = trace.row_drafted > 0
    drafted = int(trace.row_drafted.sum())
    accepted = int(trace.row_accepted[verify].sum())
    pos0, _ = trace.row_starts()
    draft_positions = np.concatenate([pos0[r] + np.arange(trace.row_drafted[r]) for r in np.flatnonzero(verify)])
    actual = trace.routes[draft_positions][:, :, 0]  # [K, L]
    guess = trace.predicted[:, :, 0]  # [K, L]
    made = guess >= 0
    gen_lengths = np.diff(trace.gen_offsets)
    return {"prompts": trace.num_prompts, "prompt_tokens": int(len(trace.prompt_tokens)),
            "new_tokens_per_prompt": f"{gen_lengths.min()}-{gen_lengths.max()}" if gen_lengths.min() != gen_lengths.max()
            else str(int(gen_lengths[0])),
            "k": int(trace.meta.get("spec_k") or 0), "verify_steps": int(verify.sum()),
            "acceptance": accepted / drafted if drafted else None,
            "tau": 1 + accepted / int(verify.sum()) if verify.any() else None,
            "predictor_top1": float((guess[made] == actual[made]).mean()) if made.any() else None,
            "layers": trace.num_layers, "experts": trace.num_experts, "top_k": trace.top_k}


def record(spec: TraceSpec, runs_dir: Path, out_dir: Path) -> Path:
    """One `run.py` run into `runs_dir/<name>`; its routing_trace.npz is copied to `out_dir/<name>.npz`."""
    run_dir = runs_dir / spec.name
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh recording, never a resumed one
    cmd = [sys.executable, "run.py", *spec.overrides(), f"hydra.run.dir={run_dir}"]
    log.info("recording %s: %s", spec.name, " ".join(cmd[1:]))
    subprocess.run(cmd, cwd=ROOT, check=True)
    src = run_dir / "routing_trace.npz"
    trace = load_trace(src)
    if trace.meta.get("dataset") != spec.dataset or int(trace.meta.get("spec_k") or 0) != spec.k:
        raise RuntimeError(f"{src} holds dataset {trace.meta.get('dataset')} k={trace.meta.get('spec_k')},"
                           f" expected {spec.dataset} k={spec.k}")
    size = src.stat().st_size
    if size > MAX_TRACE_BYTES:
        raise RuntimeError(f"{src} is {size} bytes, over the {MAX_TRACE_BYTES}-byte limit for a committed trace")
    dst = out_dir / f"{spec.name}.npz"
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    tmp.replace(dst)
    log.info("%s: %d bytes, %s", dst, size, trace_stats(trace))
    return dst


def _fmt(x: float | None, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def prompt_ids(dataset: str, seed: int) -> list[str]:
    """The ids of the prompts a run with this dataset and seed draws (the same draw as `run.py`)."""
    vocab = 259
    chosen = load_prompts(DatasetConfig(name=dataset), ByteTokenizer(vocab), vocab, NUM_PROMPTS, seed)
    return [p.prompt_id for p in chosen]


def readme(out_dir: Path) -> str:
    """The traces directory's README: one row per committed trace, and the command that made it."""
    specs = {s.name: s for s in ALL_TRACES}
    rows, commands, drawn = [], [], {}
    for path in sorted(out_dir.glob("*.npz")):
        trace = load_trace(path)
        key = (trace.meta["dataset"], int(trace.meta["seed"]))
        drawn[key] = drawn.get(key) or prompt_ids(*key)
        s = trace_stats(trace)
        rows.append(f"| `{path.name}` | {trace.meta.get('dataset')} | {s['prompts']} | {s['prompt_tokens']} |"
                    f" {s['new_tokens_per_prompt']} | {s['k']} | {s['verify_steps']} | {_fmt(s['acceptance'])} |"
                    f" {_fmt(s['tau'], 2)} | {_fmt(s['predictor_top1'])} | {path.stat().st_size / 1e6:.2f} MB |"
                    f" `{str(trace.meta.get('git_sha') or '-')[:7]}` |")
        spec = specs.get(path.stem)
        commands.append(f"    {spec.command() if spec else '(not made by this script)'}   # {path.name}")
    pair = PairConfig()
    calibration = {f"gsm8k/{i}" for i in range(pair.calib_offset, pair.calib_offset + pair.calib_texts)}
    gsm8k_drawn = {i for (ds, _), ids in drawn.items() if ds == "gsm8k" for i in ids}
    overlap = sorted(calibration & gsm8k_drawn)
    prompt_lines = [f"- {ds} (seed {seed}): {', '.join(ids)}" for (ds, seed), ids in sorted(drawn.items())]
    return "\n".join([
        "# The real pair's routing traces",
        "",
        "Recorded routing of the real small pair (target `smollm2_moe`: SmolLM2-135M-Instruct upcycled to a",
        "30-layer Mixtral MoE, 8 experts top-2, k-means routers fitted on GSM8K test rows 0-63; draft `smollm2`)",
        "under SP-MoE with every layer predicted, greedy SD, on the CPU. `routing=replay` replays them on any",
        "8-expert top-2 model (`spmoe/trace/replay.py` maps 30 trace layers onto the replay model's depth;",
        "Mixtral's 32 layers repeat two of them). Prompts are raw text (no chat template), drawn as `run.py`",
        "draws them. GSM8K prompts among the router calibration rows:",
        f"{', '.join(overlap) if overlap else 'none'}. Format: `spmoe/trace/routing.py`.",
        "",
        "Prompt ids:",
        "",
        *prompt_lines,
        "",
        "Regenerate every trace and this file (CPU, a few minutes per trace on 2 cores; needs the pair built",
        "with `python -m spmoe.models.real_pair`):",
        "",
        "    python -m experiments.record_traces",
        "",
        "acceptance = accepted / drafted tokens; tau = 1 + accepted / verify steps; predictor top-1 = fraction",
        "of (draft token, layer) pairs whose predicted first expert is the target's first routed expert at that",
        "position. All three are computed from the trace file (`experiments/record_traces.py`); prompt tokens",
        "are summed over the prompts; `sha` is the commit the trace was recorded at.",
        "",
        "| trace | dataset | prompts | prompt tokens | new tokens / prompt | k | verify steps | acceptance | tau |"
        " predictor top-1 | size | sha |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Each trace's command (`hydra.run.dir` set by the script; the run's `routing_trace.npz` is copied here):",
        "",
        *commands,
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help=f"comma-separated trace names (default all: {[s.name for s in ALL_TRACES]})")
    ap.add_argument("--out", type=Path, default=TRACE_DIR)
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "outputs" / "record_traces")
    ap.add_argument("--readme-only", action="store_true", help="rewrite README.md from the traces in --out")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    specs = {s.name: s for s in ALL_TRACES}
    names = [n for n in args.only.split(",") if n] or list(specs)
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise SystemExit(f"unknown traces {unknown}; valid: {list(specs)}")
    if not args.readme_only:
        for name in names:
            record(specs[name], args.runs_dir.resolve(), args.out)
    write_text_atomic(args.out / "README.md", readme(args.out))
    log.info("wrote %s", args.out / "README.md")


if __name__ == "__main__":
    main()

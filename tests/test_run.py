"""End to end through the real entry point: `python run.py ...` in a subprocess (DESIGN.md sections 8-9).

Three subprocesses (~10-20 s each on a 2-core CPU box): one single run checked against the run-output
contract, one bad group option, one 2-job multirun.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# DESIGN.md section 9: summary.json / the last stdout line carries at least these keys
REQUIRED_KEYS = (
    "method", "model", "draft", "dataset", "hardware", "weights", "num_prompts", "num_generated_tokens",
    "tpot_ms", "tpot_p50_ms", "tpot_p90_ms", "ttft_ms", "tokens_per_s", "acceptance_rate",
    "mean_acceptance_length", "expert_hits", "expert_misses", "prefetch_hits", "late_prefetches",
    "wasted_prefetches", "h2d_bytes", "h2d_gb_per_s", "stall_ms", "peak_gpu_bytes", "gpu_budget_bytes",
    "lossless", "device", "git_sha", "torch_version", "transformers_version",
)
MOE_LAYERS = 4  # conf/model/tiny.yaml: every one of its 4 decoder layers is a MoE layer


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "out"
    proc = run_py("max_new_tokens=8", f"hydra.run.dir={run_dir}")  # the default run, shorter
    return proc, run_dir


def test_single_run_exit_code_and_stdout(single_run):
    proc, _ = single_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    assert lines, "nothing printed on stdout"
    summary = json.loads(lines[-1])
    missing = [k for k in REQUIRED_KEYS if k not in summary]
    assert not missing, f"summary lacks keys required by DESIGN.md section 9: {missing}"
    # the defaults of conf/config.yaml: SP-MoE on the tiny twin with its tiny draft, on the tiny emulated card
    assert (summary["method"], summary["model"], summary["draft"], summary["dataset"], summary["hardware"],
            summary["weights"]) == ("spmoe", "tiny", "tiny", "humaneval", "tiny_card", "twin")
    assert summary["num_prompts"] == 2
    assert summary["num_generated_tokens"] == 16
    assert summary["lossless"] is True
    assert summary["tpot_ms"] > 0 and summary["ttft_ms"] > 0 and summary["tokens_per_s"] > 0
    # it offloads for real, speculates and prefetches: the default run shows the project
    assert summary["num_slots"] < summary["num_experts_total"] and summary["cache_holds_all_experts"] is False
    assert summary["expert_misses"] > 0 and summary["prefetch_hits"] > 0 and summary["acceptance_rate"] > 0
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("== ") and any("acceptance" in line for line in lines[:-1])  # the digest
    assert not any(line.startswith("[") for line in lines), "log lines belong on stderr"


def test_single_run_files(single_run):
    proc, run_dir = single_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    stdout_summary = json.loads(proc.stdout.strip().splitlines()[-1])
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk.pop("config")["model"]["name"] == "tiny"  # the resolved config is in the file, not on stdout
    assert on_disk == stdout_summary
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list(run_dir.glob("*.log")), "no log file in the run dir"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    trace = read_jsonl(run_dir / "trace.jsonl")
    assert [r["phase"] == "prefill" for r in trace] == [r["step"] == 0 for r in trace]
    assert [r["step"] for r in trace if r["prompt_idx"] == 0] == list(range(sum(r["prompt_idx"] == 0 for r in trace)))
    assert sum(r["num_emitted"] for r in trace) == 16  # one record per step; SD steps emit up to k + 1 tokens
    assert sorted({r["prompt_idx"] for r in trace}) == [0, 1]
    for r in trace:
        assert [ev["layer"] for ev in r["layers"]] == list(range(MOE_LAYERS)), r
        for ev in r["layers"]:
            assert {"needed", "hits", "misses"} <= set(ev)

    gens = read_jsonl(run_dir / "generations.jsonl")
    assert len(gens) == 2 and all(len(g["token_ids"]) == 8 for g in gens)


def test_unknown_method_lists_the_options(tmp_path):
    proc = run_py("method=nope", f"hydra.run.dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode != 0
    assert "Available options" in proc.stderr, proc.stderr[-4000:]
    for name in ("gpu_resident", "lru_nosd", "accelerate"):
        assert name in proc.stderr
    assert not (tmp_path / "out" / "summary.json").exists()


def test_multirun_two_methods(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_py("-m", "method=gpu_resident,lru_nosd", "num_prompts=1", "max_new_tokens=4",
                  "hardware=cpu", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2, sorted(p.name for p in sweep.iterdir())
    assert len({p.parent for p in summaries}) == 2
    loaded = [json.loads(p.read_text()) for p in summaries]
    assert sorted(s["method"] for s in loaded) == ["gpu_resident", "lru_nosd"]
    for s in loaded:
        assert s["num_generated_tokens"] == 4
        assert s["lossless"] is True
    for p in summaries:
        assert (p.parent / ".hydra" / "config.yaml").is_file()
        assert len(read_jsonl(p.parent / "trace.jsonl")) == 4
    # an interrupted sweep: one job's outputs lost, the sweep rerun -> only that job runs again
    gone = [p for p in summaries if json.loads(p.read_text())["method"] == "lru_nosd"][0]
    kept = [p for p in summaries if p != gone][0]
    kept_before = kept.read_text()
    gone.unlink()
    proc = run_py("-m", "method=gpu_resident,lru_nosd", "num_prompts=1", "max_new_tokens=4",
                  "hardware=cpu", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert kept.read_text() == kept_before  # the finished job was not redone
    assert json.loads(gone.read_text())["method"] == "lru_nosd"  # the missing one was
    assert "not redone" in proc.stderr + proc.stdout
    names = sorted(p.parent.name for p in summaries)  # job directories are named by the overrides' values
    assert "method=gpu_resident" in names[0] and "method=lru_nosd" in names[1] and "max_new_tokens=4" in names[0]

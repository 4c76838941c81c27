"""
Plant a bug, run the CPU suite, see it fail: a check that the tests can catch what they claim to.

    python -m experiments.planted_bugs --out results/runtime/planted_bugs      # every bug, one suite run each

Each bug is a patch applied in the test process (this module is also a pytest plugin: `-p
experiments.planted_bugs` with `SPMOE_PLANT=<bug>` applies it at configure time), on the path every method
shares, so a test that compares methods only with each other cannot see it:
- `routing_weights_ignored`: the routes' outputs are summed with equal weights (`combine_routes`, the
  weighted sum of every experts module, GPU-resident included);
- `stale_expert`: an expert loaded into a slot that held another one leaves the slot's old weights there
  (the copy's source is the slot itself; the transfer's bookkeeping is unchanged);
- `kv_position_lost`: after a step that accepted drafts, the target's KV cache is cropped one position
  short, and stays short from then on (every later crop keeps the loss), so no length check trips: the
  next forwards attend over a sequence missing that position and write at shifted positions.
A bug is caught when at least one test fails. Each run stops at `--maxfail` failures; the plugin counts
how often the patch fired (a patch that never fires proves nothing) and writes the count to
`$SPMOE_PLANT_LOG`. Writes `table.md` and `planted_bugs.csv` under --out: per bug, caught or not, the
failing tests, the times the patch fired and the run's seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from spmoe.io import write_text_atomic

ENV, LOG_ENV = "SPMOE_PLANT", "SPMOE_PLANT_LOG"
_fired = {"count": 0}


def _fire() -> None:
    _fired["count"] += 1


def _routing_weights_ignored() -> None:
    from spmoe.models import experts
    from spmoe.plus import host_experts

    original = experts.combine_routes

    def combine_equal(ys, weights, act_fn):
        _fire()
        return original(ys, weights.new_ones(weights.shape) / weights.shape[-1], act_fn)

    experts.combine_routes = combine_equal
    host_experts.combine_routes = combine_equal


def _stale_expert() -> None:
    from spmoe.offload.transfer import TransferEngine

    original = TransferEngine.load

    def load(self, slot, dst, src, *args, **kwargs):
        seen = self.__dict__.setdefault("_planted_seen", set())
        if slot in seen:
            _fire()
            src = dst.detach().to(src.device).clone()
        seen.add(slot)
        return original(self, slot, dst, src, *args, **kwargs)

    TransferEngine.load = load


def _kv_position_lost() -> None:
    from spmoe.engine import Engine

    original = Engine._accept

    def _accept(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        decoder = self.decoder
        if "_planted_lost" not in decoder.__dict__:  # the decoder's KV cache stays `lost` positions short
            decoder._planted_lost, decoder._planted_armed, crop = 0, False, decoder.crop

            def crop_short(length: int) -> None:
                if length == 0:  # a new sequence
                    decoder._planted_lost = 0
                if decoder._planted_armed:
                    decoder._planted_armed = False
                    decoder._planted_lost += 1
                    _fire()
                crop(max(0, length - decoder._planted_lost))

            decoder.crop = crop_short
        decoder._planted_armed = result.num_accepted > 0  # the engine's crop right after acceptance loses one
        return result

    Engine._accept = _accept


BUGS = {"routing_weights_ignored": _routing_weights_ignored, "stale_expert": _stale_expert,
        "kv_position_lost": _kv_position_lost}


def pytest_configure(config) -> None:
    bug = os.environ.get(ENV)
    if bug:
        if bug not in BUGS:
            raise ValueError(f"{ENV}={bug!r}; valid: {', '.join(BUGS)}")
        BUGS[bug]()


def pytest_unconfigure(config) -> None:
    if os.environ.get(ENV) and os.environ.get(LOG_ENV):
        Path(os.environ[LOG_ENV]).write_text(json.dumps({"fired": _fired["count"]}))


def _first_error_lines(stdout: str) -> list[str]:
    """Each failure section's first `E` line (its exception or assertion), in report order."""
    reasons, section = [], None
    for line in stdout.splitlines():
        if re.match(r"^_{3,} .+ _{3,}$", line):
            section = len(reasons)
            reasons.append("")
        elif section is not None and line.startswith("E ") and not reasons[section]:
            reasons[section] = line[1:].strip()[:120]
    return reasons


def run_bug(bug: str, tests: list[str], maxfail: int, log_path: Path) -> dict:
    env = dict(os.environ, **{ENV: bug, LOG_ENV: str(log_path)})
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "experiments.planted_bugs", f"--maxfail={maxfail}",
           "-p", "no:cacheprovider", "-rf", *tests]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    failed = [line.split(" ", 2)[1] for line in out.stdout.splitlines() if line.startswith("FAILED ")]
    reasons = _first_error_lines(out.stdout)
    fired = json.loads(log_path.read_text())["fired"] if log_path.exists() else None
    return {"bug": bug, "caught": bool(failed), "failed_tests": failed, "reasons": reasons, "fired": fired,
            "seconds": round(time.perf_counter() - t0, 1), "exit_code": out.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bugs", default=",".join(BUGS))
    ap.add_argument("--tests", nargs="*", default=["tests"], help="pytest paths (default: the whole CPU suite)")
    ap.add_argument("--maxfail", type=int, default=3)
    ap.add_argument("--out", default="results/runtime/planted_bugs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for bug in args.bugs.split(","):
        if bug not in BUGS:
            raise SystemExit(f"unknown bug {bug!r}; valid: {', '.join(BUGS)}")
        rows.append(run_bug(bug, args.tests, args.maxfail, out / f".{bug}.fired.json"))
        (out / f".{bug}.fired.json").unlink(missing_ok=True)
        print(json.dumps(rows[-1]), flush=True)
    table = pd.DataFrame([{**r, "failed_tests": " ".join(r["failed_tests"]), "reasons": " | ".join(r["reasons"])}
                          for r in rows])
    write_text_atomic(out / "planted_bugs.csv", table.to_csv(index=False))
    lines = [f"Planted bugs against `python -m pytest {' '.join(args.tests)}` (stops at {args.maxfail} failures).", "",
             "| bug | caught | patch fired | failing tests (how each failed) | s |", "|---|---|---|---|---|"]
    for r in rows:
        tests = "<br>".join(f"`{t}`: {why.replace('|', '/')}".rstrip(": ")
                            for t, why in zip(r["failed_tests"], r["reasons"] + [""] * len(r["failed_tests"])))
        lines.append(f"| `{r['bug']}` | {'yes' if r['caught'] else '**no**'} | {r['fired']} | {tests or 'none'} |"
                     f" {r['seconds']} |")
    write_text_atomic(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

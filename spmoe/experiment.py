"""
Running cases side by side: one loaded model and store, several cases, interleaved rounds.

Terms: a *case* is one resolved `RunConfig` with a name and its own run directory; cases of one
experiment share the model, draft, dataset, routing, seed, prompt count, output length and device,
and may differ in method, hardware card (budget, pacing) and `spec.*`. A *round* runs every case
once over all prompts; round r runs the cases in order for even r and reversed for odd r
(A B C C B A), so slow drifts of the host (clocks, page cache, allocator) fall on every case alike.

Invariants: every case is planned (device and host memory) before anything is loaded; a case whose
run directory already holds a summary of its exact config is not rerun, unless a time limit cut that
summary short (fewer rounds than planned, or its check skipped) and this run has more time (no limit, or
a larger one): it is then run again, the earlier summary kept until a new one replaces it; each case's
summary is the
round with the median TPOT (the lower of the middle two for an even count, so `tpot_ms` ==
`tpot_ms_median`) plus every round's TPOT and their spread, written atomically and last;
a case that fails leaves `partial/`, never a summary. Before round 0 every case decodes a warm-up
(`warmup_plan`): the first case of each step shape a whole round's length, the others a few tokens.
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import pstats
import shutil
import traceback
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

from spmoe.config import RunConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.offload.budget import BudgetError
from spmoe.offload.pacing import pinned_gb_per_s
from spmoe.rundir import config_hash, discard_summary, finished_summary
from spmoe.session import GIB, Session, open_session
from spmoe.strategy import get_strategy
from spmoe.summary import summarize_run, write_partial, write_run
from spmoe.time_limit import TimeLimit
from spmoe.trace.lossless import LosslessCheck, ReferenceRuntime, check_lossless
from spmoe.trace.metrics import summarize
from spmoe.trace.oracle import runtime_efficiency

log = logging.getLogger(__name__)

_SHARED = ("model", "draft", "dataset", "routing", "seed", "num_prompts", "max_new_tokens")


@dataclass
class Case:
    name: str | None  # None: a plain run (its directory is the run directory itself)
    cfg: RunConfig
    out_dir: Path
    config: dict | None = None  # the resolved config as composed (default: the dataclass as a dict)
    rounds: list = field(default_factory=list)  # per round: (gens, plan, peak, extra, routing)

    @property
    def hash(self) -> str:
        return config_hash(self.config if self.config is not None else asdict(self.cfg))


def check_shared(cases: list[Case]) -> None:
    first = cases[0].cfg
    for case in cases[1:]:
        for key in _SHARED:
            if getattr(case.cfg, key) != getattr(first, key):
                raise ValueError(f"case {case.name!r} changes {key!r}; cases of one experiment share {list(_SHARED)}"
                                 " (sweep it instead: python run.py -m ...)")
        if case.cfg.hardware.device != first.hardware.device:  # the session runs every case on its device
            raise ValueError(f"case {case.name!r} runs on hardware.device={case.cfg.hardware.device!r}, the first"
                             f" case on {first.hardware.device!r}; cases of one experiment share the device (cards"
                             " of one device type differ only in budget and pacing)")


def _progress_bar(enabled: bool, case: Case, round_idx: int):
    if not enabled:
        return nullcontext(None)
    from tqdm import tqdm

    total = case.cfg.num_prompts * case.cfg.max_new_tokens
    return tqdm(total=total, desc=f"{case.name or case.cfg.method.name} round {round_idx}", unit="tok", leave=False)


def _run_round(session: Session, case: Case, round_idx: int, progress: bool, profile: bool = False) -> None:
    cfg = case.cfg
    profiler = cProfile.Profile() if profile else None
    with _progress_bar(progress, case, round_idx) as bar:
        try:
            if profiler is not None:
                profiler.enable()
            gens, plan, peak = session.generate(cfg.method, cfg.hardware, cfg.max_new_tokens, spec_cfg=cfg.spec,
                                                on_prompt=bar.update if bar is not None else None)
        except BaseException as exc:
            write_partial(case.out_dir, session, getattr(exc, "finished_generations", []), exc)
            raise
        finally:
            if profiler is not None:
                profiler.disable()
    case.rounds.append((gens, plan, peak, dict(session.last_extra), session.last_routing))
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
        write_text_atomic(case.out_dir / "profile.txt", f"# cProfile of round {round_idx} (host time)\n{text.getvalue()}")


def _warm_up(session: Session, case: Case, num_tokens: int) -> None:
    """Decode `num_tokens` of the first prompt (not recorded): kernels, allocator and caches warm."""
    cfg = case.cfg
    session.generate(cfg.method, cfg.hardware, min(num_tokens, cfg.max_new_tokens), num_prompts=1, spec_cfg=cfg.spec)


def warmup_plan(cases: list[Case], warmup_tokens: int, drafts: Callable[[Case], bool] | None = None) -> list[int]:
    """Tokens each case decodes before round 0. The first case of each step shape (positions per verify
    step: 1 without SD, k + 1 with it) decodes a whole round's length, so every KV length and step shape
    the timed rounds reach has run once in the process; the others decode `warmup_tokens`. `drafts(case)`
    says whether a case drafts (default: its method is speculative; a session also knows which decline)."""
    seen: set[int] = set()
    plan = []
    for case in cases:
        spec = drafts(case) if drafts is not None else get_strategy(case.cfg.method.name).speculative
        shape = case.cfg.spec.num_draft_tokens + 1 if spec else 1
        plan.append(case.cfg.max_new_tokens if shape not in seen else warmup_tokens)
        seen.add(shape)
    return plan


UNCHECKED = "not checked"  # a lossless_reason's start when the time limit skipped the check


# a lossless check teacher-forces the GPU-resident reference over a case's tokens: under a time limit, each
# case run with check_lossless=true is owed this share of the slowest case run for its check
CHECK_SHARE = 0.35


def _check_demanded(case: Case) -> bool:
    return str(case.cfg.check_lossless).lower() == "true"


def _demanded_check_skipped(case: Case, summary: dict) -> bool:
    """A case run with check_lossless=true whose check the time limit skipped: not finished."""
    return (_check_demanded(case) and summary["lossless"] is None
            and str(summary.get("lossless_reason", "")).startswith(UNCHECKED))


def _worth_rerunning(summary: dict, limit_s: float | None) -> bool:
    """A summary a time limit cut short (fewer rounds than planned, or its lossless check skipped), when this
    run has more time than the one that wrote it: no limit, or a larger one than its recorded limit."""
    rounds, planned = summary.get("rounds"), summary.get("rounds_planned")
    cut_short = ((rounds is not None and planned is not None and rounds < planned)
                 or str(summary.get("lossless_reason") or "").startswith(UNCHECKED))
    experiment = (summary.get("config") or {}).get("experiment") or {}
    recorded_s = experiment.get("time_limit_s") if isinstance(experiment, dict) else None
    return cut_short and recorded_s is not None and (limit_s is None or limit_s > recorded_s)


def _tpot_ms(gens) -> float | None:
    return summarize([g.records for g in gens])["tpot_ms"]


def _summarize(session: Session, case: Case, experiment: str | None, reference: ReferenceRuntime,
               limit: TimeLimit, rounds_planned: int) -> tuple[dict, list, object]:
    """The case's summary from its median-TPOT round, with that round's generations and routing trace."""
    tpots = [_tpot_ms(r[0]) for r in case.rounds]  # None when no token was decoded (max_new_tokens=1)
    timed = None not in tpots
    median_round = sorted(range(len(tpots)), key=tpots.__getitem__)[(len(tpots) - 1) // 2] if timed else 0
    gens, plan, peak, extra, routing = case.rounds[median_round]
    session.last_extra, session.last_routing = extra, routing
    check = None
    if _wants_reference(case.cfg, reference):
        if limit.allows("check"):
            with limit.timed("check"):
                check = check_lossless(session, gens, temperature=case.cfg.spec.temperature, reference=reference,
                                       method=case.cfg.method)
        else:
            check = LosslessCheck(None, f"{UNCHECKED}: experiment.time_limit_s={limit.limit_s} reached")
    if check is not None and case.name is not None:  # a plain run's digest says it; an experiment's log names the case
        log.info("%s: lossless %s (%s)", case.name, check.lossless, check.reason)
    summary = summarize_run(session, case.cfg.method, case.cfg.hardware, gens, plan, peak, check, spec_cfg=case.cfg.spec)
    median = tpots[median_round] if timed else None  # the low median for an even count: the summarized round
    summary.update({
        "experiment": experiment, "case": case.name, "rounds": len(tpots), "rounds_planned": rounds_planned,
        "tpot_ms_rounds": tpots,
        "tpot_ms_median": median, "tpot_ms_min": min(tpots) if timed else None,
        "tpot_ms_max": max(tpots) if timed else None,
        "tpot_spread": None if not timed else (max(tpots) - min(tpots)) / median if median else 0.0,
        "cache_holds_all_experts": summary["num_slots"] >= summary["num_experts_total"],
        "config_hash": case.hash, "config": case.config if case.config is not None else asdict(case.cfg),
    })
    return summary, gens, routing


def link_gb_per_s(session: Session, summary: dict) -> float | None:
    """The link a run's copies crossed: the paced rate, or the measured pinned bandwidth (CUDA only; the one
    measurement the pacer and the draft choice use, `spmoe.offload.pacing.pinned_gb_per_s`)."""
    if summary.get("pcie_paced_gb_per_s"):
        return summary["pcie_paced_gb_per_s"]
    if session.device.type != "cuda":
        return None
    return pinned_gb_per_s(session.device)


def sibling_floor(cases: list[Case]) -> list[dict]:
    """Summaries of GPU-resident cases beside these cases' directories but not among them (an experiment
    run with `experiment.only`), for the compute floor of `add_runtime_efficiency`: those whose recorded
    config shares this experiment's model, draft, dataset, routing, seed and sizes."""
    first = cases[0]
    if first.name is None or first.config is None:
        return []
    names = {c.name for c in cases}
    out = []
    for path in sorted(first.out_dir.parent.glob("gpu_resident*/summary.json")):
        if path.parent.name in names:
            continue
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        config = summary.get("config")
        if isinstance(config, dict) and all(config.get(k) == first.config.get(k) for k in _SHARED):
            out.append(summary)
    return out


def add_runtime_efficiency(session: Session, summaries: list[dict], floor: list[dict] = ()) -> None:
    """runtime efficiency = TPOT / (H2D bytes per token / link bandwidth + GPU compute per token), for
    offloaded cases of an experiment that also ran `gpu_resident` (no SD) or `gpu_resident_sd` (SD):
    their TPOT is the compute that cannot overlap. `floor`: summaries of the experiment's cases
    reused from an earlier process, read for that compute only."""
    compute_ms = {s["method"] == "gpu_resident_sd": s["tpot_ms"] for s in (*floor, *summaries)
                  if s.get("method") in ("gpu_resident", "gpu_resident_sd") and s.get("tpot_ms")}
    for s in summaries:
        speculative = s.get("acceptance_rate") is not None
        if s["method"].startswith("gpu_resident") or speculative not in compute_ms or not s.get("h2d_bytes_per_token"):
            continue
        bandwidth = link_gb_per_s(session, s)
        if bandwidth:
            s["runtime_efficiency"] = runtime_efficiency(s["tpot_ms"], s["h2d_bytes_per_token"], bandwidth,
                                                         compute_ms[speculative])
            s["runtime_efficiency_link_gb_per_s"] = bandwidth
            s["runtime_efficiency_compute_ms"] = compute_ms[speculative]


def _write(session: Session, case: Case, summary: dict, gens: list, routing) -> None:
    """The case's files, summary last; an earlier failed attempt's error.json and partial/ go first."""
    (case.out_dir / "error.json").unlink(missing_ok=True)
    shutil.rmtree(case.out_dir / "partial", ignore_errors=True)
    session.last_routing = routing
    write_run(case.out_dir, session, gens, summary)


def _check_budget(case: Case, summary: dict) -> None:
    if summary["within_budget"] is False:
        raise BudgetError(f"case {case.name or case.cfg.method.name}: peak GPU memory"
                          f" {summary['peak_gpu_bytes'] / GIB:.2f} GiB exceeded the budget of"
                          f" {summary['gpu_budget_bytes'] / GIB:.2f} GiB (summary.json records within_budget=false)")


def _wants_reference(cfg: RunConfig, reference: ReferenceRuntime) -> bool:
    mode = str(cfg.check_lossless).lower()
    return mode == "true" or (mode == "auto" and reference.fits())


def run_cases(cases: list[Case], rounds: int = 1, warmup_tokens: int = 0, experiment: str | None = None,
              resume: bool = True, progress: bool = False, profile: bool = False,
              time_limit: TimeLimit | None = None) -> list[dict]:
    """Run `cases` in interleaved rounds on one session; return their summaries in case order.

    Under `time_limit`, a round, a case's run within a round, or a case's lossless check that would not
    end within it is skipped: the summaries then hold the rounds that ran (`rounds` < `rounds_planned`)
    and `lossless` null with the reason for an unchecked case. A case that got no round at all is
    returned as `{"case", "experiment", "skipped"}` and nothing of it is written, so rerunning the same
    command into the same directory runs just the cases still missing (a long experiment split over
    several calls of a lent machine); so is a case run with check_lossless=true whose check was skipped.

    With several cases, a case that fails while running (e.g. a method whose caches cannot fit the
    card) is dropped from the later rounds and returned as `{"case", "experiment", "error"}` with the
    same in `<case dir>/error.json` (no summary.json: a resumed experiment retries it); the others
    go on; a case whose memory plan does not fit its card is recorded the same way before anything is
    loaded. A single run's error propagates, as does any other planning error."""
    if rounds < 1:
        raise ValueError(f"experiment.rounds must be >= 1, got {rounds}")
    if not cases:
        raise ValueError("an experiment needs at least one case")
    check_shared(cases)
    done = {id(c): finished_summary(c.out_dir, c.hash) if resume else discard_summary(c.out_dir) for c in cases}
    # a summary a time limit cut short is run again when there is more time now; it stays on disk (and is
    # returned) until replaced
    limit_s = time_limit.limit_s if time_limit is not None else None
    cut_short = {id(c): done[id(c)] for c in cases
                 if done[id(c)] is not None and _worth_rerunning(done[id(c)], limit_s)}
    for case in cases:
        if id(case) in cut_short:
            done[id(case)] = None
            log.info("%s: the summary in %s was cut short by a time limit (%s of %s rounds, lossless: %s): with"
                     " more time now, running it again", case.name or "run", case.out_dir, cut_short[id(case)].get(
                         "rounds"), cut_short[id(case)].get("rounds_planned"), cut_short[id(case)].get("lossless_reason"))
    todo = [c for c in cases if done[id(c)] is None]
    for case in cases:
        if done[id(case)] is not None:
            log.info("%s: finished run of this exact config found in %s: not redone", case.name or "run", case.out_dir)
    if todo:
        if len(todo) < len(cases):
            log.info("running %d of %d cases; the others were measured in an earlier process", len(todo), len(cases))
        isolate = len(cases) > 1
        budget_errors: dict[int, BudgetError] | None = {} if isolate else None
        session = open_session(todo[0].cfg, [c.cfg for c in todo[1:]], budget_errors)
        try:
            for i, exc in (budget_errors or {}).items():  # cases that do not fit their card
                _attempt(isolate, done, todo[i], experiment, lambda e=exc: _raise(e))
            if warmup_tokens > 0:
                session.touch_store()
                warm = [c for c in todo if done[id(c)] is None]
                def drafts(c: Case) -> bool:  # a speculative method may decline the draft (strategy.accepts_draft)
                    return session.drafts(c.cfg.hardware, c.cfg.method, c.cfg.spec)

                for case, num_tokens in zip(warm, warmup_plan(warm, warmup_tokens, drafts)):
                    _attempt(isolate, done, case, experiment, lambda c=case, n=num_tokens: _warm_up(session, c, n))
            limit = time_limit or TimeLimit(None)

            def owed_checks_s(case: Case | None = None) -> float:
                """Time kept for the demanded checks of the cases with a round (and `case`, about to run)."""
                owed = [c for c in todo if done[id(c)] is None and _check_demanded(c) and (c.rounds or c is case)]
                return len(owed) * CHECK_SHARE * limit.slowest_s("case")

            for r in range(rounds):
                if not limit.allows("round", owed_checks_s()):
                    log.warning("experiment.time_limit_s=%s: %d of %d rounds fit (%.0f s elapsed)",
                                limit.limit_s, r, rounds, limit.elapsed_s())
                    break
                with limit.timed("round"):
                    for case in (todo if r % 2 == 0 else todo[::-1]):
                        if done[id(case)] is not None:
                            continue
                        if not limit.allows("case", owed_checks_s(case)):
                            log.warning("experiment.time_limit_s=%s: %s skips round %d (%.0f s elapsed)",
                                        limit.limit_s, case.name, r, limit.elapsed_s())
                            continue
                        with limit.timed("case"):
                            _attempt(isolate, done, case, experiment,
                                     lambda c=case: _run_round(session, c, r, progress, profile and r == rounds - 1))
            for case in todo:
                if done[id(case)] is None and not case.rounds and id(case) in cut_short:  # the earlier one stands
                    done[id(case)] = cut_short[id(case)]
                elif done[id(case)] is None and not case.rounds:  # nothing measured: not written, a rerun runs it
                    done[id(case)] = {"case": case.name, "experiment": experiment, "skipped": (
                        f"experiment.time_limit_s={limit.limit_s} reached before its first round; rerun the same"
                        " command into the same directory to run it (finished cases are kept)")}
                    log.warning("%s: %s", case.name, done[id(case)]["skipped"])
            results = {}
            with ReferenceRuntime(session) as reference:  # every expert preloaded once for all the checks
                for case in [c for c in todo if done[id(c)] is None]:
                    _attempt(isolate, done, case, experiment, lambda c=case: results.__setitem__(
                        id(c), _summarize(session, c, experiment, reference, limit, rounds)))
            running = [c for c in todo if id(c) in results and done[id(c)] is None]
            resumed = [done[id(c)] for c in cases if c not in todo] + sibling_floor(cases)
            add_runtime_efficiency(session, [results[id(c)][0] for c in running], floor=resumed)
            for case in running:
                summary, gens, routing = results[id(case)]
                if _demanded_check_skipped(case, summary):  # its point is the check: a rerun redoes it
                    done[id(case)] = {"case": case.name, "experiment": experiment, "skipped": (
                        f"check_lossless=true, and its lossless check did not fit experiment.time_limit_s="
                        f"{limit.limit_s}; rerun the same command into the same directory to run it")}
                    log.warning("%s: %s", case.name, done[id(case)]["skipped"])
                    continue
                _write(session, case, summary, gens, routing)
                done[id(case)] = summary
            for case in running:  # after every case is written
                if "skipped" not in done[id(case)]:
                    _check_budget(case, done[id(case)])
        finally:
            session.close()
    return [done[id(c)] for c in cases]


def _raise(exc: BaseException) -> None:
    raise exc


def _attempt(isolate: bool, done: dict, case: Case, experiment: str | None, fn) -> None:
    if not isolate:
        fn()
        return
    try:
        fn()
    except Exception as exc:  # one case's failure must not cost the other cases' numbers
        error = f"{type(exc).__name__}: {exc}"
        log.exception("case %s failed, dropped from the remaining rounds: %s", case.name, error)
        done[id(case)] = {"case": case.name, "experiment": experiment, "error": error,
                          "traceback": traceback.format_exc()}
        write_json_atomic(case.out_dir / "error.json", done[id(case)])


def run_benchmark(cfg: RunConfig, out_dir: str | Path, resume: bool = False) -> dict:
    """One case, one round, into `out_dir`."""
    return run_cases([Case(None, cfg, Path(out_dir))], resume=resume)[0]

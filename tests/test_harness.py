"""The harness as a user meets it: the mission command's composition and refusal, experiment configs
(every one composes; every CPU variant runs end to end), interleaved cases, resume by config hash, the
run-directory lock, and user errors that fail at once with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from experiments.presets import CONF_DIR
from spmoe.auto import TRACE_DIR, auto_choices
from spmoe.rundir import RunDirLock, config_hash

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import run as entry  # noqa: E402  (the entry point's composition functions)

EXPERIMENTS = sorted(str(p.relative_to(CONF_DIR / "experiment").with_suffix("")) for p in
                     (CONF_DIR / "experiment").rglob("*.yaml") if p.stem != "none")
CPU_EXPERIMENTS = [e for e in EXPERIMENTS if e.startswith("cpu/")]


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "run.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def _typed(*overrides: str):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_mission_command_resolves_the_papers_setup():
    cfg = _typed("model=mixtral", "dataset=humaneval", "method=spmoe")
    assert (cfg.draft.name, cfg.hardware.name, cfg.routing.name) == ("auto", "auto", "auto")
    on_gpu = auto_choices(cfg, cuda_available=True)
    assert on_gpu["draft"] == "mistral_7b" and on_gpu["hardware"] == "rtx4090" and on_gpu["routing"] == "replay"
    assert Path(on_gpu["routing.trace_path"]) == TRACE_DIR / "humaneval_k1.npz"
    assert auto_choices(cfg, cuda_available=False)["hardware"] == "cpu"
    full = _typed("model=mixtral", "dataset=humaneval", "method=spmoe",
                  *(f"{k}={v}" for k, v in on_gpu.items()))
    assert full.hardware.emulated and full.hardware.gpu_budget_gib == 24 and full.hardware.pace_pcie
    # a checkpoint routes with its own routers; explicit choices are never changed
    ckpt = _typed("model=mixtral", "model.weights=checkpoint", "draft=none", "hardware=h200")
    assert auto_choices(ckpt, cuda_available=True) == {"routing": "model"}


@pytest.mark.parametrize("model,draft", [("phimoe", "phi_mini_moe"), ("deepseek_v2_lite", "int8_self"),
                                         ("qwen3_moe", "qwen3_0_6b"), ("tiny", "tiny")])
def test_each_model_names_its_paired_draft(model, draft):
    assert auto_choices(_typed(f"model={model}"), cuda_available=False)["draft"] == draft


def test_mission_command_refused_at_once_on_a_small_host(tmp_path):
    start = time.perf_counter()
    proc = run_py("model=mixtral", "dataset=humaneval", "method=spmoe", "hardware.host_memory_gib=16",
                  f"hydra.run.dir={tmp_path / 'out'}", timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert time.perf_counter() - start < 90
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "GiB of host memory" in errors[0] and "16.0 GiB" in errors[0] and "python run.py model=tiny" in errors[0]
    assert not (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_every_case(name, tmp_path):
    cuda = not name.startswith("cpu/")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=[f"experiment={name}"])
        assert dcfg.experiment.name == name and dcfg.experiment.cases
        sweep = OmegaConf.select(dcfg, "hydra.sweeper.params", default=None) or {}
        first_point = [f"{k}={str(v).split(',')[0]}" for k, v in sweep.items()]
        original = entry._compose
        entry._compose = lambda overrides: _compose_with(overrides, cuda)
        try:
            cases = entry._cases(dcfg, [f"experiment={name}", *first_point], tmp_path)
        finally:
            entry._compose = original
    assert [c.name for c in cases] == list(dcfg.experiment.cases)
    assert len({c.hash for c in cases}) == len(cases)  # every case is a different config
    assert all(c.out_dir == tmp_path / c.name for c in cases)


def _compose_with(overrides, cuda):
    from hydra import compose as hydra_compose

    dcfg = hydra_compose(config_name="config", overrides=overrides)
    choices = auto_choices(OmegaConf.to_object(dcfg), cuda)
    taken = {entry._key(o) for o in overrides}
    dcfg = hydra_compose(config_name="config", overrides=[*overrides, *(f"{k}={v}" for k, v in choices.items()
                                                                       if k not in taken)])
    return OmegaConf.to_object(dcfg), OmegaConf.to_container(dcfg, resolve=True)


@pytest.mark.parametrize("name", CPU_EXPERIMENTS)
def test_cpu_experiment_runs_end_to_end(name, tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=[f"experiment={name}"])
        sweep = OmegaConf.select(dcfg, "hydra.sweeper.params", default=None) or {}
        overrides = [f"experiment={name}", *(f"{k}={str(v).split(',')[0]}" for k, v in sweep.items())]
        cases = entry._cases(dcfg, overrides, tmp_path)
    from spmoe.experiment import run_cases

    summaries = run_cases(cases, rounds=dcfg.experiment.rounds, warmup_tokens=dcfg.experiment.warmup_tokens,
                          experiment=name)
    for case, summary in zip(cases, summaries):
        on_disk = json.loads((tmp_path / case.name / "summary.json").read_text())
        assert on_disk["case"] == case.name and on_disk["experiment"] == name
        assert on_disk["config_hash"] == case.hash and len(on_disk["tpot_ms_rounds"]) == dcfg.experiment.rounds
        assert (tmp_path / case.name / "trace.jsonl").is_file()
        lossy_by_design = summary.get("lossy_reason") is not None  # labelled lossy (spmoe_plus lossy_misses)
        assert summary["lossless"] is not lossy_by_design, (case.name, summary.get("lossless_reason"))


def test_rounds_interleave_and_each_case_writes_its_own_dir(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=["experiment=cpu/harness_check"])
        cases = entry._cases(dcfg, ["experiment=cpu/harness_check", "method.num_slots=12"], tmp_path)
    cases = [c for c in cases if c.name in ("lru_nosd", "lru", "spmoe")]
    import spmoe.experiment as experiment

    order = []
    original = experiment._run_round
    experiment._run_round = lambda session, case, r, *rest: (order.append(case.name),
                                                              original(session, case, r, *rest))
    try:
        summaries = experiment.run_cases(cases, rounds=3, warmup_tokens=0)
    finally:
        experiment._run_round = original
    assert order == ["lru_nosd", "lru", "spmoe", "spmoe", "lru", "lru_nosd", "lru_nosd", "lru", "spmoe"]
    for case, s in zip(cases, summaries):
        assert len(s["tpot_ms_rounds"]) == 3 and s["tpot_ms_min"] <= s["tpot_ms_median"] <= s["tpot_ms_max"]
        assert s["tpot_spread"] == pytest.approx((s["tpot_ms_max"] - s["tpot_ms_min"]) / s["tpot_ms_median"])
        assert json.loads((tmp_path / case.name / "summary.json").read_text())["case"] == case.name


def test_warm_up_covers_a_whole_round_once_per_step_shape(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=["experiment=cpu/harness_check"])
        cases = entry._cases(dcfg, ["experiment=cpu/harness_check", "max_new_tokens=9"], tmp_path)
        k3 = entry._cases(dcfg, ["experiment=cpu/harness_check", "max_new_tokens=9", "spec.num_draft_tokens=3"],
                          tmp_path / "k3")
    from spmoe.experiment import warmup_plan

    by_name = {c.name: c for c in cases}
    order = [by_name[n] for n in ("lru_nosd", "lru", "spmoe", "moe_infinity_nosd")]
    assert warmup_plan(order, 3) == [9, 9, 3, 3]  # no SD: 1 position per step; SD k=1: 2 positions
    lru_k3 = next(c for c in k3 if c.name == "lru")
    assert warmup_plan([*order, lru_k3], 3) == [9, 9, 3, 3, 9]  # k = 3: a new shape (4 positions)
    declines = warmup_plan(order, 3, drafts=lambda c: c.name == "spmoe")  # lru declines its draft: no SD shape
    assert declines == [9, 3, 9, 3]


def test_experiment_only_runs_a_subset_and_rejects_unknown_case_names(tmp_path):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        overrides = ["experiment=cpu/harness_check", "experiment.only=[spmoe,lru]"]
        dcfg = compose(config_name="config", overrides=overrides)
        cases = entry._cases(dcfg, overrides, tmp_path)
        assert [c.name for c in cases] == ["lru", "spmoe"]  # the experiment's order, not the list's
        bad = ["experiment=cpu/harness_check", "experiment.only=[spmoe,nope]"]
        with pytest.raises(ValueError, match=r"does not define: \['nope'\].*valid: .*'spmoe'"):
            entry._cases(compose(config_name="config", overrides=bad), bad, tmp_path)


def test_every_case_is_checked_after_the_shared_reference_took_its_memory(tmp_path, monkeypatch):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        overrides = ["experiment=cpu/harness_check", "experiment.only=[lru_nosd,lru,spmoe]", "max_new_tokens=4"]
        cases = entry._cases(compose(config_name="config", overrides=overrides), overrides, tmp_path)
    from spmoe.experiment import run_cases
    from spmoe.session import Session

    asked = []

    def fits_until_the_reference_is_built(self):  # a device with room for one reference: free memory is
        asked.append(1)  # gone once it is built
        return len(asked) == 1

    monkeypatch.setattr(Session, "reference_fits", fits_until_the_reference_is_built)
    summaries = run_cases(cases, rounds=1, warmup_tokens=0, experiment="x")
    assert [s["lossless"] for s in summaries] == [True, True, True] and len(asked) == 1


def test_resume_reruns_when_the_config_changed(tmp_path):
    out = tmp_path / "run"
    args = ("method=lru_nosd", "hardware=cpu", "num_prompts=1", f"hydra.run.dir={out}")
    first = run_py(*args, "max_new_tokens=4")
    assert first.returncode == 0, first.stderr[-3000:]
    before = json.loads((out / "summary.json").read_text())
    again = run_py(*args, "max_new_tokens=4")
    assert "not redone" in again.stdout + again.stderr and json.loads((out / "summary.json").read_text()) == before
    changed = run_py(*args, "max_new_tokens=5")  # same directory, another config: the stale summary goes
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert "written for another config" in changed.stdout + changed.stderr
    after = json.loads((out / "summary.json").read_text())
    assert after["num_generated_tokens"] == 5 and after["config_hash"] != before["config_hash"]


def test_sweep_resume_follows_values_not_job_order(tmp_path):
    sweep = tmp_path / "sweep"
    args = ("-m", "method=lru_nosd", "hardware=cpu", "num_prompts=1", "max_new_tokens=3", f"hydra.sweep.dir={sweep}")
    assert run_py(*args, "seed=0,1").returncode == 0
    before = {p.parent.name: p.read_text() for p in sweep.glob("*/summary.json")}
    proc = run_py(*args, "seed=1,0")  # reordered: every job maps to its own finished directory
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("not redone") == 2, proc.stdout[-3000:]
    assert {p.parent.name: p.read_text() for p in sweep.glob("*/summary.json")} == before


def test_a_sweep_resumes_under_another_time_limit(tmp_path):
    """The time limit and the case list neither name a sweep's job directories nor enter the config hash."""
    sweep = tmp_path / "sweep"
    args = ("-m", "method=lru_nosd", "hardware=cpu", "num_prompts=1", "max_new_tokens=3", "seed=0,1",
            f"hydra.sweep.dir={sweep}")
    assert run_py(*args, "experiment.time_limit_s=500").returncode == 0
    before = {p.parent.name: p.read_text() for p in sweep.glob("*/summary.json")}
    assert len(before) == 2 and not any("time_limit" in name for name in before)
    proc = run_py(*args, "experiment.time_limit_s=400")
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("not redone") == 2, proc.stdout[-3000:]
    assert {p.parent.name: p.read_text() for p in sweep.glob("*/summary.json")} == before


def test_a_locked_run_dir_fails_at_once(tmp_path):
    out = tmp_path / "busy"
    (out / ".hydra").mkdir(parents=True)
    (out / ".hydra" / "config.yaml").write_text("the first run's record\n")
    with RunDirLock(out):
        proc = run_py("method=lru_nosd", "hardware=cpu", f"hydra.run.dir={out}", timeout=120)
    assert proc.returncode == 2 and "is in use by pid" in proc.stderr, proc.stderr[-3000:]
    assert not (out / "summary.json").exists()
    assert (out / ".hydra" / "config.yaml").read_text() == "the first run's record\n"  # not overwritten


def test_config_hash_ignores_only_bookkeeping_keys():
    base = {"seed": 0, "resume": True, "progress": "auto", "logger": {"name": "none"},
            "experiment": {"name": "x", "rounds": 2, "cases": {"a": ["method=lru"]}, "description": "d"}}
    same = dict(base, resume=False, progress="true", logger={"name": "wandb"},
                experiment=dict(base["experiment"], cases={"b": []}, description="other", only=["b"],
                                time_limit_s=500.0))
    assert config_hash(base) == config_hash(same)
    assert config_hash(base) != config_hash(dict(base, seed=1))
    assert config_hash(base) != config_hash(dict(base, experiment=dict(base["experiment"], rounds=3)))


def test_a_summary_is_judged_by_its_recorded_config_under_todays_hash(tmp_path):
    """A summary written when `experiment.only` / `time_limit_s` were still hashed (its stored hash is stale)
    is reused by a run that differs from it only there; one of another config is removed."""
    from spmoe.rundir import finished_summary

    config = {"seed": 0, "experiment": {"name": "x", "rounds": 2, "only": [], "time_limit_s": 440.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"config_hash": "0123456789abcdef", "config": config}))
    now = dict(config, experiment=dict(config["experiment"], only=["a"], time_limit_s=500.0))
    assert finished_summary(tmp_path, config_hash(now))["config"] == config
    assert finished_summary(tmp_path, config_hash(dict(now, seed=1))) is None
    assert not (tmp_path / "summary.json").exists()


def test_added_keys_fail_instead_of_being_ignored(tmp_path):
    with pytest.raises(ConfigCompositionException):
        _typed("+experiment=cpu/cutoff")  # the group already has a choice: appending fails
    proc = run_py("+no_such_key=1", "+method.cutof=1", f"hydra.run.dir={tmp_path / 'o'}", timeout=120)
    assert proc.returncode == 2 and "no_such_key" in proc.stderr and "method.cutof" in proc.stderr, proc.stderr


def test_unknown_experiment_lists_the_valid_ones():
    with pytest.raises(MissingConfigException) as err:
        _typed("experiment=nope")
    assert "cutoff" in str(err.value) and "fig10_tpot" in str(err.value)


def test_a_draft_that_cannot_pair_names_the_default_draft(tmp_path):
    proc = run_py("model=mixtral", "draft=tiny", "method=lru", "hardware=cpu",
                  f"hydra.run.dir={tmp_path / 'o'}", timeout=120)
    assert proc.returncode == 2 and "vocabulary" in proc.stderr and "draft=mistral_7b" in proc.stderr, \
        proc.stderr[-2000:]


def test_profile_and_progress_on_request(tmp_path):
    proc = run_py("experiment=cpu/harness_check", "experiment.rounds=1", "experiment.profile=true", "progress=true",
                  f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "round 0" in proc.stderr and "tok" in proc.stderr  # the tqdm bars, on stderr
    text = (tmp_path / "spmoe" / "profile.txt").read_text()
    assert "cumulative" in text and "engine.py" in text


def test_runtime_efficiency_against_the_experiments_own_compute_floor():
    from types import SimpleNamespace

    from spmoe.experiment import add_runtime_efficiency

    session = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    summaries = [
        {"method": "gpu_resident", "tpot_ms": 40.0, "acceptance_rate": None, "h2d_bytes_per_token": 0},
        {"method": "gpu_resident_sd", "tpot_ms": 100.0, "acceptance_rate": 0.9, "h2d_bytes_per_token": 0},
        {"method": "lru_nosd", "tpot_ms": 500.0, "acceptance_rate": None, "h2d_bytes_per_token": 10e9,
         "pcie_paced_gb_per_s": 25.0},
        {"method": "spmoe", "tpot_ms": 700.0, "acceptance_rate": 0.9, "h2d_bytes_per_token": 15e9,
         "pcie_paced_gb_per_s": 25.0},
        {"method": "lru", "tpot_ms": 700.0, "acceptance_rate": 0.9, "h2d_bytes_per_token": 15e9},  # CPU, unpaced
    ]
    add_runtime_efficiency(session, summaries)
    assert summaries[2]["runtime_efficiency"] == pytest.approx(500.0 / (10e9 / 25e6 + 40.0))  # no-SD floor
    assert summaries[3]["runtime_efficiency"] == pytest.approx(700.0 / (15e9 / 25e6 + 100.0))  # SD floor
    assert "runtime_efficiency" not in summaries[4]  # no link bandwidth known on the CPU
    assert "runtime_efficiency" not in summaries[0]


def test_unpaced_runtime_efficiency_uses_the_pinned_link_measurement(monkeypatch):
    """On CUDA without pacing the link is the pinned bandwidth the pacer and the draft choice measure (one
    measurement: a registered-buffer measurement once fell back to a pageable copy at half the link)."""
    from types import SimpleNamespace

    import spmoe.experiment as experiment

    monkeypatch.setattr(experiment, "pinned_gb_per_s", lambda device: 50.0)
    session = SimpleNamespace(device=SimpleNamespace(type="cuda"))
    runs = [{"method": "gpu_resident", "tpot_ms": 10.0, "acceptance_rate": None, "h2d_bytes_per_token": 0},
            {"method": "lru_nosd", "tpot_ms": 120.0, "acceptance_rate": None, "h2d_bytes_per_token": 5e9}]
    experiment.add_runtime_efficiency(session, runs)
    assert runs[1]["runtime_efficiency_link_gb_per_s"] == 50.0
    assert runs[1]["runtime_efficiency"] == pytest.approx(120.0 / (5e9 / 50e6 + 10.0))


def test_a_failing_case_does_not_cost_the_others(tmp_path):
    """mixtral_offloading needs one slot per MoE layer: with 3 slots for 4 layers it fails at build;
    the other cases finish, the failure is recorded, and the run exits non-zero."""
    proc = run_py("experiment=cpu/harness_check", "experiment.rounds=2", "method.num_slots=3",
                  "+experiment.cases.mo=['method=mixtral_offloading']", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2 and "failed" in proc.stderr, proc.stderr[-3000:]
    assert "== mo: FAILED" in proc.stdout
    error = json.loads((tmp_path / "mo" / "error.json").read_text())
    assert "per-layer cache" in error["error"] and not (tmp_path / "mo" / "summary.json").exists()
    assert "Traceback" in error["traceback"] and "per-layer cache" in error["traceback"]
    for case in ("lru_nosd", "lru", "spmoe", "moe_infinity_nosd"):
        assert len(json.loads((tmp_path / case / "summary.json").read_text())["tpot_ms_rounds"]) == 2


def test_a_rerun_without_resume_removes_the_old_summary_first(tmp_path, monkeypatch):
    """resume=false reruns even a finished directory; a run that dies on the way must not leave the old
    summary looking finished beside the new run's files."""
    import spmoe.experiment as experiment
    from conftest import tiny_run_config

    case = experiment.Case(None, tiny_run_config(), tmp_path)
    (tmp_path / "summary.json").write_text(json.dumps({"config_hash": case.hash}))

    def dies(*args, **kwargs):
        raise RuntimeError("killed while loading")

    monkeypatch.setattr(experiment, "open_session", dies)
    with pytest.raises(RuntimeError, match="killed while loading"):
        experiment.run_cases([case], resume=False)
    assert not (tmp_path / "summary.json").exists()
    (tmp_path / "summary.json").write_text(json.dumps({"config_hash": case.hash}))
    assert experiment.run_cases([case], resume=True) == [{"config_hash": case.hash}]  # resume still reuses it


def test_a_case_over_its_budget_fails_after_every_case_is_written(tmp_path, monkeypatch):
    """A peak above the budget fails the experiment, but only after each case's summary is on disk:
    the other cases' measurements are not thrown away."""
    import spmoe.experiment as experiment
    from conftest import tiny_run_config
    from spmoe.offload.budget import BudgetError

    cases = [experiment.Case(m, tiny_run_config(method=m, num_prompts=1, max_new_tokens=3), tmp_path / m)
             for m in ("gpu_resident", "lru_nosd")]
    summarize = experiment._summarize

    def over_budget_first(session, case, name, *rest):
        summary, gens, routing = summarize(session, case, name, *rest)
        if case is cases[0]:
            summary.update(within_budget=False, peak_gpu_bytes=2 * 2**30, gpu_budget_bytes=2**30)
        return summary, gens, routing

    monkeypatch.setattr(experiment, "_summarize", over_budget_first)
    with pytest.raises(BudgetError, match="case gpu_resident: peak GPU memory 2.00 GiB exceeded"):
        experiment.run_cases(cases)
    assert all((c.out_dir / "summary.json").is_file() for c in cases)


def test_one_token_runs_have_no_tpot_and_do_not_crash(tmp_path):
    """max_new_tokens=1 decodes nothing after the prefill: TPOT and its spread are null, in every round."""
    import spmoe.experiment as experiment
    from conftest import tiny_run_config

    case = experiment.Case("one", tiny_run_config(method="lru_nosd", num_prompts=1, max_new_tokens=1), tmp_path)
    (summary,) = experiment.run_cases([case], rounds=2)
    assert summary["tpot_ms_rounds"] == [None, None]
    assert summary["tpot_ms_median"] is None and summary["tpot_spread"] is None
    proc = run_py("method=lru_nosd", "hardware=cpu", "num_prompts=1", "max_new_tokens=1",
                  f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1])["tpot_ms"] is None


def test_cases_share_the_device(tmp_path):
    """The session runs every case on its own device: a case naming another would be mislabelled."""
    import dataclasses

    import spmoe.experiment as experiment
    from conftest import tiny_run_config

    cpu = tiny_run_config(method="lru_nosd")
    gpu = tiny_run_config(method="lru_nosd")
    gpu.hardware = dataclasses.replace(gpu.hardware, name="h200", device="cuda")
    with pytest.raises(ValueError, match="hardware.device='cuda'.*share the device"):
        experiment.check_shared([experiment.Case("a", cpu, tmp_path / "a"), experiment.Case("b", gpu, tmp_path / "b")])


def test_runtime_efficiency_reads_the_floor_of_a_resumed_reference():
    from types import SimpleNamespace

    from spmoe.experiment import add_runtime_efficiency

    session = SimpleNamespace(device=SimpleNamespace(type="cpu"))
    resumed = [{"method": "gpu_resident", "tpot_ms": 40.0, "acceptance_rate": None}]
    new = [{"method": "lru_nosd", "tpot_ms": 500.0, "acceptance_rate": None, "h2d_bytes_per_token": 10e9,
            "pcie_paced_gb_per_s": 25.0}]
    add_runtime_efficiency(session, new, floor=resumed)
    assert new[0]["runtime_efficiency"] == pytest.approx(500.0 / (10e9 / 25e6 + 40.0))
    assert "runtime_efficiency" not in resumed[0]


def test_a_retried_case_leaves_no_stale_error(tmp_path):
    args = ("experiment=cpu/harness_check", "experiment.rounds=1", "experiment.warmup_tokens=0",
            "+experiment.cases.mo=['method=mixtral_offloading']", "experiment.only=[lru_nosd,mo]", f"hydra.run.dir={tmp_path}")
    assert run_py(*args, "method.num_slots=3").returncode == 2
    assert (tmp_path / "mo" / "error.json").is_file()
    proc = run_py(*args, "method.num_slots=8")  # 2 slots per MoE layer: it fits now
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "mo" / "summary.json").is_file() and not (tmp_path / "mo" / "error.json").exists()


def test_a_case_that_does_not_fit_its_card_is_recorded_before_loading(tmp_path):
    """gpu_resident keeps every expert on the device: on the tiny card it cannot fit, the others run."""
    proc = run_py("experiment=cpu/harness_check", "experiment.rounds=1", "experiment.warmup_tokens=0",
                  "+experiment.cases.resident_on_card=['method=gpu_resident','hardware=tiny_card','hardware.gpu_budget_gib=0.004']",
                  "experiment.only=[resident_on_card,spmoe]", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    error = json.loads((tmp_path / "resident_on_card" / "error.json").read_text())
    assert error["error"].startswith("BudgetError") and "use an offloading method" in error["error"]
    assert (tmp_path / "spmoe" / "summary.json").is_file()


def test_the_lossless_reference_is_built_once_for_every_case(tmp_path, monkeypatch):
    import spmoe.trace.lossless as lossless

    builds = []
    original = lossless.ReferenceRuntime.get

    def counting_get(self):
        if self._runtime is None:
            builds.append(1)
        return original(self)

    monkeypatch.setattr(lossless.ReferenceRuntime, "get", counting_get)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        dcfg = compose(config_name="config", overrides=["experiment=cpu/harness_check"])
        cases = entry._cases(dcfg, ["experiment=cpu/harness_check"], tmp_path)
    from spmoe.experiment import run_cases

    summaries = run_cases(cases, rounds=1, warmup_tokens=0)
    assert all(s["lossless"] is True for s in summaries) and len(summaries) == 6
    assert builds == [1]


def test_the_compute_floor_comes_from_gpu_resident_siblings_of_the_same_setup(tmp_path):
    """A run with experiment.only=[lru_nosd] finds gpu_resident's earlier summary beside it (same model,
    routing, sizes), and not one of another setup or one of its own cases."""
    from spmoe.experiment import Case, sibling_floor

    shared = {"model": {"name": "tiny"}, "draft": {"name": "none"}, "dataset": {"name": "synthetic"},
              "routing": {"name": "model"}, "seed": 0, "num_prompts": 1, "max_new_tokens": 4}
    for name, config in [("gpu_resident", shared), ("gpu_resident_sd", dict(shared, seed=1))]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "summary.json").write_text(json.dumps({"method": name, "tpot_ms": 5.0, "config": config}))
    lru = Case("lru_nosd", None, tmp_path / "lru_nosd", dict(shared, method={"name": "lru_nosd"}))
    assert [s["method"] for s in sibling_floor([lru])] == ["gpu_resident"]
    resident = Case("gpu_resident", None, tmp_path / "gpu_resident", shared)
    assert sibling_floor([lru, resident]) == []  # a case of this run is not a sibling

"""MoE-Infinity (moe_infinity / moe_infinity_nosd): losslessness, EAM trace matching on repeated
prompts, warm start from a trace file, the collection's replacement rule, the prefetch plan and
the priority eviction policy on hand-made inputs."""

from __future__ import annotations

import json
import pytest
import torch

import baselines.moe_infinity  # noqa: F401  (registers moe_infinity / moe_infinity_nosd)
from conftest import tiny_run_config
from experiments.presets import load_preset
from spmoe.experiment import run_benchmark
from spmoe.session import open_session
from spmoe.config import MethodConfig, SpecConfig
from spmoe.offload.cache import ExpertCache
from spmoe.offload.eviction_priority import PriorityPolicy
from spmoe.predict.activation_matrix import EamCollection, load_trace_eams, plan_prefetch
from spmoe.trace.metrics import summarize

NEW_TOKENS = 20
METHODS = ["moe_infinity", "moe_infinity_nosd"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded 2-core box, 2 OpenMP threads make each small GEMM ~100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _cfg():
    cfg = tiny_run_config("tiny", num_prompts=2, max_new_tokens=NEW_TOKENS)
    cfg.draft = load_preset("draft", "tiny")
    return cfg


@pytest.fixture(scope="module")
def session(_one_thread):
    s = open_session(_cfg())
    gens, _, _ = s.generate(MethodConfig(name="gpu_resident"), s.cfg.hardware, NEW_TOKENS)
    s.reference = [g.token_ids for g in gens]
    yield s
    s.close()


def _generate(session, method: MethodConfig, k: int = 1):
    gens, _, _ = session.generate(method, session.cfg.hardware, NEW_TOKENS, spec_cfg=SpecConfig(num_draft_tokens=k))
    return gens


# -- (a) lossless ------------------------------------------------------------------------------------


@pytest.mark.parametrize("slots_per_topk", [1, 2])
@pytest.mark.parametrize("method", METHODS)
def test_greedy_tokens_match_gpu_resident(session, method, slots_per_topk):
    top_k = session.target.layout.top_k
    gens = _generate(session, MethodConfig(name=method, num_slots=top_k * slots_per_topk), k=2)
    assert [g.token_ids for g in gens] == session.reference
    decode = [r for g in gens for r in g.records if r.phase == "decode"]
    for r in decode:
        for ev in r.layers:
            assert sorted(ev.hits + ev.prefetch_hits + ev.late + ev.misses) == sorted(ev.needed)
    if method == "moe_infinity":
        drafted = [r for r in decode if r.num_drafted is not None]  # a last step with room for 1 token drafts nothing
        assert len(decode) - len(drafted) <= len(gens)
        assert all(r.num_emitted == r.num_accepted + 1 for r in drafted)


# -- (b) repeated prompt: the second run matches the first run's EAM ----------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_repeated_prompt_is_predicted_from_its_own_trace(session, method, monkeypatch):
    monkeypatch.setattr(session, "prompts", [session.prompts[0]] * 2)
    gens = _generate(session, MethodConfig(name=method, num_slots=8, worker_thread=False))
    assert gens[0].token_ids == gens[1].token_ids == session.reference[0]
    first, second = (summarize([g.records]) for g in gens)
    # first run: the collection is empty, nothing is predicted or prefetched
    assert first.get("predictor_recall") is None and first.get("prefetches_issued", 0) == 0
    assert second["predictor_recall"] > (0.7 if method == "moe_infinity_nosd" else 0.6)  # chance: 4 / 8 = 0.5
    assert second["prefetch_coverage"] > 0.1
    assert second["expert_hit_rate"] > first["expert_hit_rate"]
    assert second["expert_misses"] < first["expert_misses"]


# -- (c) warm start from an earlier run's trace.jsonl ---------------------------------------------------


@pytest.fixture(scope="module")
def lru_run(tmp_path_factory, _one_thread):
    out = tmp_path_factory.mktemp("lru_run")
    cfg = _cfg()
    cfg.method = MethodConfig(name="lru_nosd")
    run_benchmark(cfg, out)
    return out


def test_trace_file_builds_one_eam_per_prompt(session, lru_run):
    records = [json.loads(line) for line in (lru_run / "trace.jsonl").read_text().splitlines()]
    generations = [json.loads(line) for line in (lru_run / "generations.jsonl").read_text().splitlines()]
    assert [g["token_ids"] for g in generations] == session.reference  # same model and prompts
    layout = session.target.layout
    eams = load_trace_eams(lru_run / "trace.jsonl", layout.moe_layers, layout.num_experts)
    assert len(eams) == 2
    for p, eam in enumerate(eams):
        assert eam.shape == (len(layout.moe_layers), layout.num_experts)
        for i, layer in enumerate(layout.moe_layers):
            needed = [ev["needed"] for r in records if r["prompt_idx"] == p for ev in r["layers"] if ev["layer"] == layer]
            assert eam[i].sum().item() == sum(len(n) for n in needed)
            assert eam[i, needed[-1][0]].item() >= 1


@pytest.mark.parametrize("method", METHODS)
def test_warm_start_from_trace_predicts_the_first_run(session, lru_run, method, monkeypatch, tmp_path):
    """Prompt 0's first run: a collection warmed with its own earlier trace predicts it well above
    chance (width / E = 4 / 8) and far better than one warmed with another prompt's trace only."""
    monkeypatch.setattr(session, "prompts", session.prompts[:1])
    lines = (lru_run / "trace.jsonl").read_text().splitlines()
    other = tmp_path / "other.jsonl"
    other.write_text("".join(line + "\n" for line in lines if json.loads(line)["prompt_idx"] == 1))
    metrics = {}
    for name, trace in [("cold", None), ("own", lru_run / "trace.jsonl"), ("other", other)]:
        m = MethodConfig(name=method, num_slots=8, worker_thread=False)
        if trace is not None:
            m.trace_path = str(trace)  # MethodConfig has no trace_path field yet: read with getattr
        gens = _generate(session, m)
        assert gens[0].token_ids == session.reference[0]
        metrics[name] = summarize([gens[0].records])
    cold, own, other = metrics["cold"], metrics["own"], metrics["other"]
    assert cold.get("predictor_recall") is None and cold.get("prefetches_issued", 0) == 0
    assert own["predictor_recall"] > 0.6
    assert own["predictor_recall"] > other["predictor_recall"] + 0.15
    assert own["prefetch_coverage"] > 0.1
    assert own["expert_misses"] < min(cold["expert_misses"], other["expert_misses"])


def test_bad_trace_path_fails_clearly(session, tmp_path):
    method = MethodConfig(name="moe_infinity_nosd", num_slots=8)
    method.trace_path = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="trace_path"):
        _generate(session, method)
    bad = tmp_path / "trace.jsonl"
    bad.write_text('{"step": 0}\n')
    method.trace_path = str(bad)
    with pytest.raises(ValueError, match="not a step record"):
        _generate(session, method)


# -- EAM collection and prefetch plan, by hand -----------------------------------------------------------


def test_collection_matches_by_per_layer_cosine_and_replaces_least_accessed():
    a = torch.tensor([[2.0, 0, 0], [0, 1, 0]])
    b = torch.tensor([[0.0, 2, 1], [0, 0, 3]])
    c = EamCollection(2, 3, capacity=3)
    assert c.match(a) is None  # empty
    assert c.add(torch.zeros(2, 3)) is None  # nothing routed: not stored
    assert (c.add(a, persistent=True), c.add(b)) == (0, 1)
    assert c.match(torch.tensor([[1.0, 0, 0], [0, 0, 0]])) == 0  # only layer 0 seen: a's row 0
    assert c.match(torch.tensor([[0.0, 1, 0], [0, 0, 1]])) == 1
    assert c.match(torch.tensor([[0.0, 0, 0], [0, 0, 5]])) == 1
    assert c.access == [2, 3, 0]
    assert c.add(a * 3) == 2  # a free entry first
    assert c.access == [2, 3, 1]
    assert c.add(b * 2) == 2  # full: least accessed non-persistent entry (access 1)
    assert c.match(torch.tensor([[0.0, 0, 0], [0, 0, 5]])) == 1  # ties: the lowest index
    c.access[1] = 1
    assert c.add(a) == 1  # entry 2 (access 1) and 1 (access 1) tie: the lowest index; 0 is persistent
    full = EamCollection(2, 3, capacity=1)
    assert full.add(a, persistent=True) == 0 and full.add(b) is None  # only persistent entries: kept


def test_plan_prefetch_decays_with_distance_and_respects_width_and_budget():
    m = torch.tensor([[5.0, 0, 0, 0], [4, 2, 1, 0], [0, 0, 3, 3], [1, 1, 1, 1]])
    # scores: layer 1 (d=1): 4/7*.8=.457, 2/7*.8=.229; layer 2 (d=2): 3/6*.6=.3 twice
    assert plan_prefetch(m, 0, depth=2, width=2, budget=3) == [(1, [0]), (2, [2, 3])]
    assert plan_prefetch(m, 0, depth=2, width=2, budget=4) == [(1, [0, 1]), (2, [2, 3])]
    assert plan_prefetch(m, 0, depth=1, width=3, budget=9) == [(1, [0, 1, 2])]
    assert plan_prefetch(m, 2, depth=3, width=2, budget=9) == [(3, [0, 1])]  # never past the last layer
    assert plan_prefetch(m, -1, depth=1, width=4, budget=9) == [(0, [0])]  # zero counts are never predicted


# -- (d) the priority eviction policy -------------------------------------------------------------------


def test_priority_policy_victims_by_hand():
    p = PriorityPolicy((0, 1, 2), num_experts=4)
    for layer, experts in [(0, [0, 1]), (1, [2]), (2, [3]), (0, [0])]:
        p.record(layer, experts)
    p.set_layer(1)
    # score = topo * (global + 1) * (seq + 1) / (seq row + 4); layer 1 computed now:
    # topo(2) = 1 (next), topo(0) = 2/3, topo(1) = 1/3 (just computed)
    assert p.score((0, 0)) == pytest.approx(2 / 3 * 3 * 3 / 7)  # .857
    assert p.score((2, 3)) == pytest.approx(1 * 2 * 2 / 5)  # .8
    assert p.score((1, 2)) == pytest.approx(1 / 3 * 2 * 2 / 5)  # .267
    assert p.victim([(0, 0), (1, 2), (2, 3)]) == (1, 2)  # the layer just computed goes first
    assert p.victim([(0, 0), (0, 1), (2, 0)]) == (2, 0)  # never routed: .2 < .381
    assert p.victim([(0, 1), (1, 2)]) == (1, 2)
    p.new_sequence()  # sequence counts cleared (1/4 each), back before layer 0: topo(0)=1, (1)=2/3, (2)=1/3
    assert p.victim([(0, 0), (1, 2), (2, 3)]) == (2, 3)  # .167 < .333 < .75
    p.touch((0, 3))
    p.touch((0, 2))
    assert p.victim([(0, 2), (0, 3)]) == (0, 3)  # equal scores: least recently touched


def test_priority_policy_drives_the_expert_cache():
    p = PriorityPolicy((0, 1), num_experts=4)
    cache = ExpertCache(3, 4, torch.float32, "cpu", p)
    evicted = []
    for layer, experts in [(0, [0, 1]), (1, [2]), (0, [0, 3]), (1, [1])]:
        p.set_layer(layer)
        p.record(layer, experts)
        for e in experts:
            _, _, ev = cache.access((layer, e))
            evicted.append(ev)
    # (0,3) evicts (0,1): layer 0 is computed (topo .5), (0,1) has 1 use vs (0,0)'s 2: .25 < .5625, and
    # (1,2) is the next layer's (.8). (1,1) then evicts (1,2): layer 1 is computed, so its other expert
    # is needed only a whole forward later (.333) while layer 0 is next: (0,3) .5, (0,0) 1.125.
    assert [e for e in evicted if e is not None] == [(0, 1), (1, 2)]
    assert set(cache.resident()) == {(0, 0), (0, 3), (1, 1)}

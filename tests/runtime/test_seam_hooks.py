"""Seam hooks (`spmoe.models.experts.on_experts_call`): predictors' host work at the experts call runs in
an eager forward with the call's inputs, keeps a forward piecewise-capturable (the piecewise graph runs
it at every seam) and makes it not capturable whole (a whole graph would drop it)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import tiny_run_config

from spmoe.methods import get_strategy
from spmoe.models.experts import OffloadedExperts, find_experts, on_experts_call
from spmoe.runtime.graphs import graph_safe
from spmoe.session import open_session
from spmoe.strategy import MethodContext


def test_seam_hooks_see_each_experts_call_and_decide_what_graphs_may_capture():
    cfg = tiny_run_config("tiny", num_prompts=1)
    s = open_session(cfg)
    try:
        plan = s.plan(s.cfg.hardware, "lru_nosd")
        ctx = MethodContext(s.cfg, s.target, s.device, plan)
        runtime = get_strategy("lru_nosd").build(ctx)
        try:
            model = runtime.model
            experts = find_experts(model)
            assert all(isinstance(m, OffloadedExperts) for m in experts.values())
            assert graph_safe(model, s.device, experts_run_eagerly=True)
            seen = []
            handles = [on_experts_call(m, lambda h, i, w, layer=layer: seen.append((layer, h.shape, i.clone())))
                       for layer, m in experts.items()]
            assert not any(m._forward_pre_hooks for m in experts.values())  # not torch hooks
            assert graph_safe(model, s.device, experts_run_eagerly=True)  # piecewise graphs keep them
            assert not graph_safe(model, s.device)  # a whole graph would drop them
            routes = []
            capture = [m.register_forward_pre_hook(lambda mod, a: routes.append(a[1].clone())) for m in experts.values()]
            with torch.inference_mode():
                model(input_ids=torch.tensor([[5, 7, 9]]), use_cache=False)
            for h in capture:
                h.remove()
            assert [layer for layer, _, _ in seen] == list(experts)
            assert all(shape == (3, cfg.model.hf_config["hidden_size"]) for _, shape, _ in seen)
            assert all(torch.equal(i, r) for (_, _, i), r in zip(seen, routes))
            for h in handles:
                h.remove()
                h.remove()  # a second remove is a no-op
            assert not any(m.seam_hooks for m in experts.values())
        finally:
            runtime.close()
    finally:
        s.close()


def test_baseline_predictors_hook_the_experts_call():
    """MoE-Infinity's, Mixtral-Offloading's and AdapMoE's (gating on) target hooks are seam hooks or
    graph-safe: their models stay piecewise-capturable (an offloaded cache: a full one has no predictor)."""
    cfg = tiny_run_config("tiny", num_prompts=1)
    s = open_session(cfg)
    try:
        for name in ("moe_infinity_nosd", "mixtral_offloading_nosd", "adapmoe_nosd"):
            plan = s.plan(s.cfg.hardware, name)
            plan = replace(plan, num_slots=len(s.target.layout.keys) - 1)
            runtime = get_strategy(name).build(MethodContext(s.cfg, s.target, s.device, plan))
            try:
                experts = find_experts(runtime.model)
                assert all(m.seam_hooks for m in experts.values()), name
                assert graph_safe(runtime.model, s.device, experts_run_eagerly=True), name
                assert not graph_safe(runtime.model, s.device), name  # never captured whole without its hooks
            finally:
                runtime.close()
    finally:
        s.close()


def test_seam_hooks_refuse_to_run_inside_a_capture(monkeypatch):
    """Inside a CUDA graph capture (faked here) a seam hook that is not graph-safe would sync or hand pinned
    buffers to other threads: the experts call refuses it (the capture fails, the decoder runs eagerly) and
    runs none of the hooks; graph-safe ones (device work only) run."""
    import spmoe.models.experts as experts_mod
    from spmoe.hooks import mark_graph_safe

    cfg = tiny_run_config("tiny", num_prompts=1)
    s = open_session(cfg)
    try:
        plan = s.plan(s.cfg.hardware, "lru_nosd")
        runtime = get_strategy("lru_nosd").build(MethodContext(s.cfg, s.target, s.device, plan))
        try:
            module = next(iter(find_experts(runtime.model).values()))
            hidden = torch.zeros(1, cfg.model.hf_config["hidden_size"])
            index, weights = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2)
            calls = []
            safe = on_experts_call(module, mark_graph_safe(lambda h, i, w: calls.append("safe")))
            monkeypatch.setattr(experts_mod, "capturing", lambda device: True)
            module.run_seam_hooks(hidden, index, weights)
            assert calls == ["safe"]
            host = on_experts_call(module, lambda h, i, w: calls.append("host"))
            with pytest.raises(RuntimeError, match="inside a CUDA graph capture"):
                module.run_seam_hooks(hidden, index, weights)
            assert calls == ["safe"]
            monkeypatch.setattr(experts_mod, "capturing", lambda device: False)
            module.run_seam_hooks(hidden, index, weights)
            assert calls == ["safe", "safe", "host"]
            for h in (safe, host):
                h.remove()
        finally:
            runtime.close()
    finally:
        s.close()

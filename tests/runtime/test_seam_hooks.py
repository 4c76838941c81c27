"""Seam hooks (`spmoe.models.experts.on_experts_call`): predictors' host work at the experts call runs in
an eager forward with the call's inputs, keeps a forward piecewise-capturable (the piecewise graph runs
it at every seam) and makes it not capturable whole (a whole graph would drop it)."""

from __future__ import annotations

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
    graph-safe: their models stay piecewise-capturable."""
    cfg = tiny_run_config("tiny", num_prompts=1)
    s = open_session(cfg)
    try:
        for name in ("moe_infinity_nosd", "mixtral_offloading_nosd", "adapmoe_nosd"):
            plan = s.plan(s.cfg.hardware, name)
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

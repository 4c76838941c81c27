"""The committed routing traces (results/real_pair/traces/*.npz): each loads and validates, holds
sane contents, and replays onto the `mixtral` preset's layout (32 MoE layers, 8 experts top-2)
through RouteReplay's layer map, for an SD method with the trace's k and for plain decoding.
No model is built: the replay hooks run on stand-in routers."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from experiments.presets import load_preset
from experiments.record_traces import ALL_TRACES, MAX_NEW_TOKENS, MAX_TRACE_BYTES, NUM_PROMPTS, TRACE_DIR
from spmoe.models.experts import ExpertLayout
from spmoe.trace.replay import RouteReplay, map_layer
from spmoe.trace.routing import load_trace

TRACES = sorted(TRACE_DIR.glob("*.npz"))
NAME = re.compile(r"(?P<dataset>[a-z0-9]+)_k(?P<k>\d+)\.npz")


def mixtral_layout() -> ExpertLayout:
    hf = load_preset("model", "mixtral").hf_config
    return ExpertLayout(moe_layers=tuple(range(hf["num_hidden_layers"])), num_experts=hf["num_local_experts"],
                        top_k=hf["num_experts_per_tok"], hidden_size=hf["hidden_size"],
                        intermediate_size=hf["intermediate_size"], dtype=torch.bfloat16)


class _Router(nn.Module):
    """Stands in for a router: (logits, top_k_weights [T, A], top_k_index [T, A]) of T positions."""

    def __init__(self, top_k: int):
        super().__init__()
        self.top_k = top_k

    def forward(self, t: int):
        return None, torch.full((t, self.top_k), 0.5), torch.full((t, self.top_k), -7, dtype=torch.long)


def _stand_in_model(layout: ExpertLayout) -> nn.Module:
    """model.model.layers[i].mlp.gate, the path `router_of` follows."""
    layers = nn.ModuleList()
    for _ in layout.moe_layers:
        layer = nn.Module()
        layer.mlp = nn.Module()
        layer.mlp.gate = _Router(layout.top_k)
        layers.append(layer)
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = layers
    return model


def test_the_expected_traces_are_committed():
    assert {p.name for p in TRACES} == {f"{s.name}.npz" for s in ALL_TRACES}


@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_trace_is_valid(path: Path):
    assert path.stat().st_size < MAX_TRACE_BYTES
    t = load_trace(path)
    m = NAME.fullmatch(path.name)
    assert t.meta["dataset"] == m["dataset"] and t.meta["spec_k"] == int(m["k"])
    assert (t.meta["model"], t.meta["draft"], t.meta["method"]) == ("smollm2_moe", "smollm2", "spmoe")
    assert (t.num_layers, t.num_experts, t.top_k, t.num_prompts) == (30, 8, 2, NUM_PROMPTS)
    assert t.meta["format_version"] == 2 and t.route_weights is not None
    assert t.routes.min() >= 0 and t.routes.max() < t.num_experts
    assert np.all(np.sort(t.routes, axis=-1)[..., 1:] != np.sort(t.routes, axis=-1)[..., :-1])  # distinct per position
    assert np.isfinite(t.route_weights).all() and (t.route_weights > 0).all()
    assert t.predicted.min() >= 0 and t.predicted.max() < t.num_experts  # cutoff=all: every layer predicted
    assert t.lookahead.min() >= -1 and t.lookahead.max() < t.num_experts
    verify = t.row_step > 0
    assert np.all((t.row_accepted[verify] >= 0) & (t.row_accepted[verify] <= t.row_drafted[verify]))
    for p in range(t.num_prompts):
        rows = t.rows_of(p)
        assert len(t.prompt(p)) == t.row_positions[rows[0]]
        emitted = 1  # the prefill's token
        for r in rows[1:]:  # k drafts per verify step, fewer only where fewer tokens remain
            assert t.row_drafted[r] == min(t.meta["spec_k"], MAX_NEW_TOKENS - emitted - 1)
            emitted += int(t.row_accepted[r]) + 1
        assert emitted == len(t.generation(p)) == MAX_NEW_TOKENS


@pytest.mark.parametrize("speculative", [True, False], ids=["sd", "nosd"])
@pytest.mark.parametrize("path", TRACES, ids=lambda p: p.stem)
def test_trace_replays_onto_the_mixtral_layout(path: Path, speculative: bool):
    t = load_trace(path)
    layout = mixtral_layout()
    assert (len(layout.moe_layers), layout.num_experts, layout.top_k) == (32, 8, 2)
    k = t.meta["spec_k"]
    replay = RouteReplay(t, layout, speculative=speculative, num_draft_tokens=k)
    vocab = load_preset("model", "mixtral").hf_config["vocab_size"]
    prompts = replay.prompts(vocab, NUM_PROMPTS, MAX_NEW_TOKENS)
    assert all(0 <= i < vocab for p in prompts for i in p.token_ids)
    model = _stand_in_model(layout)
    replay.install(model)
    gates = [model.model.layers[i].mlp.gate for i in layout.moe_layers]
    trace_layer = [map_layer(i, 32, t.num_layers) for i in range(32)]
    assert sorted(set(trace_layer)) == list(range(t.num_layers))  # every traced layer is replayed
    pos0, _ = t.row_starts()
    walked = (NUM_PROMPTS - 1,)  # every forward of the last prompt goes through the hooks; the others only start
    try:
        for p in range(NUM_PROMPTS):
            if p not in walked:
                replay.begin_step(0)
                continue
            rows = t.rows_of(p)
            # (positions into routes, drafted) of each replayed step: the trace's rows with SD; without SD
            # the prefill, then one step per committed position of each verify row
            expected = ([(np.arange(pos0[r], pos0[r] + t.row_positions[r]), int(t.row_drafted[r])) for r in rows]
                        if speculative else
                        [(np.arange(pos0[rows[0]], pos0[rows[0]] + t.row_positions[rows[0]]), 0)]
                        + [(np.array([pos0[r] + j]), 0) for r in rows[1:] for j in range(t.row_accepted[r] + 1)])
            got_index, got_weights, want = [], [], []
            emitted = 0
            for step, (positions, num_drafted) in enumerate(expected):
                replay.begin_step(step)
                outs = [gate(len(positions)) for gate in gates]  # (_, weights [T, A], index [T, A]) per layer
                got_weights.append(torch.stack([o[1] for o in outs], dim=1))  # [T, 32, A]
                got_index.append(torch.stack([o[2] for o in outs], dim=1))  # [T, 32, A]
                want.append(positions)
                for j in range(num_drafted):
                    guess = replay.predicted(layout.moe_layers[j % len(gates)], j)  # [1, P]
                    assert guess is not None and 0 <= guess.min() and guess.max() < layout.num_experts
                result = replay.accept(list(range(num_drafted)), torch.zeros(num_drafted + 1, vocab))
                emitted += len(result.token_ids) if step > 0 else 1
                replay.end_step()
            assert emitted == MAX_NEW_TOKENS
            positions = np.concatenate(want)  # [T_all]
            want_index = t.routes[positions][:, trace_layer].astype(np.int64)  # [T_all, 32, A]
            assert torch.equal(torch.cat(got_index), torch.from_numpy(want_index))
            assert torch.equal(torch.cat(got_weights), torch.from_numpy(t.route_weights[positions][:, trace_layer]))
    finally:
        replay.remove()

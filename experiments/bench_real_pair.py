"""
Measurements of the real small pair (SmolLM2-135M-Instruct draft, its upcycled MoE target) on CPU.

    python -m spmoe.models.real_pair                      # build once (~1.5 min)
    python -m experiments.bench_real_pair --out results/real_pair

Per dataset (HumanEval, GSM8K, MT-Bench; raw prompt text, no chat template): acceptance and tau
for k in {1, 3}; target-vs-draft greedy agreement (the draft's argmax on the target's own output);
draft->target-router top-1 accuracy and set recall per capture point; and, from the target's
non-SD decode steps (one token each): expert load balance (usage entropy / log2 E, mean over
layers), temporal locality (probability that a token shares an expert with the previous token,
against the chance value for random top-k sets), and unique experts per layer per verify step.
Per-layer accuracy per capture point goes to `by_layer.csv` / `by_layer.md`, a few generated
samples to `samples.md`. Timings are CPU and not reported.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections import Counter
from pathlib import Path

import pandas as pd
import torch

from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.config import MethodConfig, RunConfig, SpecConfig
from spmoe.io import write_text_atomic
from spmoe.predict.router_agreement import router_agreement

log = logging.getLogger("bench_real_pair")


def routing_stats(gens, num_experts: int, top_k: int) -> dict:
    usage: dict[int, Counter] = {}
    shared, pairs = 0, 0
    for g in gens:
        prev: dict[int, set[int]] = {}
        for r in g.records:
            if r.phase != "decode":
                continue
            for ev in r.layers:
                usage.setdefault(ev.layer, Counter()).update(ev.needed)
                now = set(ev.needed)
                if ev.layer in prev:
                    pairs += 1
                    shared += bool(now & prev[ev.layer])
                prev[ev.layer] = now
    entropy = []
    for counts in usage.values():
        total = sum(counts.values())
        entropy.append(-sum(c / total * math.log2(c / total) for c in counts.values()) / math.log2(num_experts))
    chance = 1 - math.comb(num_experts - top_k, top_k) / math.comb(num_experts, top_k)
    return {"load_balance": sum(entropy) / len(entropy), "locality": shared / pairs if pairs else None,
            "locality_chance": chance}


@torch.inference_mode()
def draft_agreement(session, gens) -> float:
    agree = total = 0
    for p, g in zip(session.prompts, gens):
        seq = p.token_ids + g.token_ids
        logits = session.draft(input_ids=torch.tensor([seq])).logits[0]  # [T, V]
        pred = logits[len(p.token_ids) - 1: len(seq) - 1].argmax(-1).tolist()
        agree += sum(a == b for a, b in zip(pred, g.token_ids))
        total += len(g.token_ids)
    return agree / total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="humaneval,gsm8k,mtbench")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out", default="results/real_pair")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    rows, samples, layer_rows = [], [], []
    for dataset in args.datasets.split(","):
        cfg = RunConfig(model=load_preset("model", "smollm2_moe"), draft=load_preset("draft", "smollm2"),
                        dataset=load_preset("dataset", dataset, max_prompt_tokens=256),
                        method=MethodConfig(name="gpu_resident"), hardware=load_preset("hardware", "cpu"),
                        max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts)
        session = open_session(cfg)
        try:
            layout = session.target.layout
            ref, _, _ = session.generate(MethodConfig(name="gpu_resident"), cfg.hardware, args.max_new_tokens)
            row = {"dataset": dataset, "prompts": args.num_prompts, "tokens": args.max_new_tokens,
                   "draft_agreement": draft_agreement(session, ref),
                   **routing_stats(ref, layout.num_experts, layout.top_k)}
            for k in (1, 3):
                gens, _, _ = session.generate(MethodConfig(name="gpu_resident_sd"), cfg.hardware, args.max_new_tokens,
                                              spec_cfg=SpecConfig(num_draft_tokens=k))
                steps = [r for g in gens for r in g.records if r.num_drafted]
                accepted, drafted = sum(r.num_accepted for r in steps), sum(r.num_drafted for r in steps)
                row[f"acceptance_k{k}"] = accepted / drafted
                row[f"tau_k{k}"] = 1 + accepted / len(steps)
                row[f"unique_experts_k{k}"] = sum(len(ev.needed) for r in steps for ev in r.layers) / sum(
                    len(r.layers) for r in steps)
                row[f"lossless_k{k}"] = [g.token_ids for g in gens] == [g.token_ids for g in ref]
            seqs = [p.token_ids + g.token_ids for p, g in zip(session.prompts, ref)]
            by_layer: dict = {}
            for point, (top1, recall) in router_agreement(session, seqs, by_layer).items():
                row[f"top1_{point}"], row[f"recall_{point}"] = top1, recall
            layer_rows += [{"dataset": dataset, "capture_point": point, "layer": layer,
                            "top1": sum(v[0] for v in vals) / len(vals), "recall": sum(v[1] for v in vals) / len(vals)}
                           for (point, layer), vals in by_layer.items()]
            rows.append(row)
            for p, g in zip(session.prompts[:1], ref[:1]):
                samples.append(f"### {dataset} / {p.prompt_id}\n\nprompt (tail):\n```\n{p.text[-300:]}\n```\n"
                               f"target output:\n```\n{session.tokenizer.decode(g.token_ids)}\n```\n")
            log.info("%s", row)
        finally:
            session.close()
    df = pd.DataFrame(rows)
    out = Path(args.out)
    write_text_atomic(out / "summary.csv", df.to_csv(index=False, float_format="%.4g"))
    write_text_atomic(out / "table.md", "Real pair (SmolLM2-135M-Instruct draft, upcycled 8x top-2 MoE target), CPU,"
                      f" {args.num_prompts} prompts x {args.max_new_tokens} tokens per dataset.\n\n"
                      + df.T.to_markdown(floatfmt=".3g") + "\n")
    write_text_atomic(out / "samples.md", "\n".join(samples))
    layers = pd.DataFrame(layer_rows)
    write_text_atomic(out / "by_layer.csv", layers.to_csv(index=False, float_format="%.4g"))
    wide = layers.groupby(["capture_point", "layer"])[["top1", "recall"]].mean().unstack("capture_point")
    wide.columns = [f"{metric}_{point}" for metric, point in wide.columns]
    write_text_atomic(out / "by_layer.md", "Predictor accuracy per MoE layer and capture point (the draft's hidden"
                      " state through the target's router of the same layer), mean over datasets and prompts.\n\n"
                      + wide.to_markdown(floatfmt=".3f") + "\n")
    print(df.T.to_string())


if __name__ == "__main__":
    main()

"""
Foundation benchmark (GPU): GPU-resident vs plain transformers `generate`, on-demand LRU/LFU
offloading and HF accelerate offload under an emulated 24 GiB budget, all on one loaded model.

    python -m experiments.bench_foundation --model mixtral --num-prompts 2 --out results/foundation

Measures, side by side in one process (the machines are noisy; only same-run ratios count):
- pinned host->device bandwidth (a 1 GiB page-locked buffer, the physical ceiling);
- `hf_generate`: transformers `generate` with its own fused experts fully on the GPU;
- `gpu_resident`: the engine with every expert resident (same expert code as offloading);
- `lru_nosd` / `lfu_nosd` at the rtx4090 profile (24 GiB budget, emulated on the H200);
- `accelerate` at the same budget, for a few tokens (it is ~100x slower).
Floor of an offloaded run = its H2D bytes per token / pinned bandwidth + gpu_resident TPOT;
`floor_ratio` = TPOT / floor (1.0 = every byte streamed at the ceiling, nothing else added).
Writes `<out>/summary.csv`, `<out>/table.md`, `<out>/meta.json` and every run's full summary in
`<out>/runs.json`; prints the table last.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import pandas as pd
import torch
from transformers.generation.streamers import BaseStreamer

from experiments.presets import load_preset
from spmoe.session import open_session
from spmoe.summary import summarize_run, write_run
from spmoe.config import MethodConfig, RunConfig
from spmoe.io import write_json_atomic, write_text_atomic
from spmoe.models.experts import find_experts

log = logging.getLogger("bench_foundation")
GIB = 2**30


def pinned_bandwidth_gb_per_s(device: torch.device, nbytes: int = GIB, repeats: int = 10) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8)
    torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)
    try:
        dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            dev.copy_(host, non_blocking=True)
        end.record()
        torch.cuda.synchronize(device)
        return nbytes * repeats / (start.elapsed_time(end) * 1e6)
    finally:
        torch.cuda.cudart().cudaHostUnregister(host.data_ptr())


class _TokenClock(BaseStreamer):
    """Wall time of every `put`: the first is the prompt, then one per generated token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate(session, max_new_tokens: int) -> dict:
    """Plain transformers generate with transformers' own fused experts on the device."""
    from transformers import AutoModelForCausalLM

    model, layout, store = session.target.model, session.target.layout, session.target.store
    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(session.hf_cfg)
    ours = {idx: model.model.layers[idx].mlp.experts for idx in layout.moe_layers}
    for idx, hf_experts in find_experts(ref).items():
        with torch.device(session.device):
            fused = type(hf_experts)(session.hf_cfg).to(layout.dtype)
        for e in range(layout.num_experts):
            gate_up, down = layout.split(store.flat((idx, e)))
            fused.gate_up_proj.data[e].copy_(gate_up)
            fused.down_proj.data[e].copy_(down)
        model.model.layers[idx].mlp.experts = fused
    tpots, tokens = [], []
    try:
        for p in session.prompts:
            clock = _TokenClock()
            ids = torch.tensor([p.token_ids], device=session.device)
            out = model.generate(ids, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                 streamer=clock, pad_token_id=0, eos_token_id=None)
            new = out[0, len(p.token_ids):].tolist()
            tokens.append(new)
            tpots.append((clock.times[-1] - clock.times[1]) / (len(new) - 1) * 1e3)
    finally:
        for idx, experts in ours.items():
            model.model.layers[idx].mlp.experts = experts
        del fused
        if session.device.type == "cuda":
            torch.cuda.empty_cache()
    return {"tpot_ms": sum(tpots) / len(tpots), "tokens": tokens}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="mixtral")
    ap.add_argument("--dataset", default="humaneval")
    ap.add_argument("--num-prompts", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=100)
    ap.add_argument("--budget-hardware", default="rtx4090")
    ap.add_argument("--lfu-prompts", type=int, default=1)
    ap.add_argument("--accelerate-tokens", type=int, default=4)
    ap.add_argument("--out", default="results/foundation")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the script itself")
    ap.add_argument("--trace-dir", default=None, help="also write full run dirs (traces) here")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)

    h200 = load_preset("hardware", "h200", device=args.device)
    budget_hw = load_preset("hardware", args.budget_hardware, device=args.device)
    cfg = RunConfig(model=load_preset("model", args.model), dataset=load_preset("dataset", args.dataset),
                    method=MethodConfig(name="gpu_resident"), hardware=h200,
                    max_new_tokens=args.max_new_tokens, num_prompts=args.num_prompts)
    device = torch.device(args.device)
    bw = pinned_bandwidth_gb_per_s(device) if device.type == "cuda" else float("nan")
    log.info("pinned H2D bandwidth %.1f GB/s", bw)
    t0 = time.perf_counter()
    session = open_session(cfg)
    build_s = time.perf_counter() - t0
    log.info("model built in %.1f s", build_s)

    rows, summaries = [], {}

    def run(case: str, method: MethodConfig, hw, max_new_tokens: int, num_prompts: int, reference):
        gens, plan, peak = session.generate(method, hw, max_new_tokens, num_prompts)
        s = summarize_run(session, method, hw, gens, plan, peak, reference)
        s["case"] = case
        summaries[case] = s
        if args.trace_dir:
            write_run(Path(args.trace_dir) / case, session, gens, s)
        return gens, s

    try:
        hf = hf_generate(session, args.max_new_tokens)
        ref_gens, ref = run("gpu_resident", MethodConfig(name="gpu_resident"), h200, args.max_new_tokens,
                            args.num_prompts, None)
        reference = [g.token_ids for g in ref_gens]
        ref["lossless"] = True
        hf_agree = sum(a == b for t, r in zip(hf["tokens"], reference) for a, b in zip(t, r)) / sum(
            len(t) for t in hf["tokens"])
        rows.append({"case": "hf_generate", "hardware": "h200", "tpot_ms": hf["tpot_ms"], "tokens": args.max_new_tokens,
                     "prompts": args.num_prompts, "token_agreement": hf_agree})
        run("lru_nosd", MethodConfig(name="lru_nosd", eviction="lru"), budget_hw, args.max_new_tokens,
            args.num_prompts, reference)
        run("lfu_nosd", MethodConfig(name="lru_nosd", eviction="lfu"), budget_hw, args.max_new_tokens,
            args.lfu_prompts, reference)
        run("accelerate", MethodConfig(name="accelerate"), budget_hw, args.accelerate_tokens, 1,
            [r[: args.accelerate_tokens] for r in reference])
    finally:
        session.close()

    compute_ms = ref["tpot_ms"]
    for case, s in summaries.items():
        per_tok = s["h2d_bytes_per_token"] or 0.0
        floor_ms = per_tok / (bw * 1e6) + compute_ms
        rows.append({
            "case": case, "hardware": s["hardware"], "tpot_ms": s["tpot_ms"], "tokens": s["max_new_tokens"],
            "prompts": s["num_prompts"], "num_slots": s["num_slots"], "hit_rate": s["expert_hit_rate"],
            "h2d_gb_per_token": per_tok / 1e9, "h2d_gb_per_s": s["h2d_gb_per_s"], "stall_ms": s["stall_ms"],
            "floor_ms": floor_ms, "floor_ratio": s["tpot_ms"] / floor_ms,
            "peak_gib": (s["peak_gpu_bytes"] or 0) / GIB,
            "budget_gib": None if s["gpu_budget_bytes"] is None else s["gpu_budget_bytes"] / GIB,
            "within_budget": s["within_budget"], "lossless": s["lossless"], "token_agreement": s["token_agreement"],
        })
    df = pd.DataFrame(rows)
    hf_tpot = hf["tpot_ms"]
    df["vs_hf_generate"] = df["tpot_ms"] / hf_tpot
    meta = {"model": args.model, "weights": "random", "dataset": args.dataset, "pinned_gb_per_s": bw,
            "build_s": build_s, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "budget_hardware": args.budget_hardware,
            "note": f"{args.budget_hardware} budget emulated on the H200 (memory only; PCIe not paced)"}
    write_text_atomic(out / "summary.csv", df.to_csv(index=False, float_format="%.4g"))
    md = "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + df.to_markdown(index=False, floatfmt=".4g") + "\n"
    write_text_atomic(out / "table.md", md)
    write_json_atomic(out / "meta.json", meta)
    write_json_atomic(out / "runs.json", summaries)
    print(json.dumps(meta))
    print(df.to_string(index=False, float_format=lambda x: f"{x:.4g}"))


if __name__ == "__main__":
    main()

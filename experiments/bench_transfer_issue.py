"""
Host cost of issuing one expert copy, side by side in one process (CUDA only).

    python -m experiments.bench_transfer_issue --mib 16.5 --loads 200 --rounds 6 --out results/runtime/transfer_issue

Cases, in interleaved rounds (raw engine stock stock engine raw ...), after one warm-up round each:
- `raw`: `dst.copy_(src, non_blocking=True)` under the copy stream, nothing else: the floor.
- `engine`: `TransferEngine.load` then `release` (free-event wait, timing events, ready event, stats), unpaced.
- `stock`: the same work written with `torch.cuda.stream(...)` and argument-less `Event.record()`, which resolve
  the current device through `torch.cuda.is_available()` on every call (the idiom `spmoe.runtime.streams.on_stream`
  and explicit-stream records replace).
Host us per load = wall time to issue `--loads` copies into `--slots` cycling slots / loads; the synchronize that
ends each round is not timed. The copies are real (`--mib` each, pinned), so the device queue never runs dry.
Writes `transfer_issue.csv` and `table.md` under --out and prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from spmoe.offload.transfer import TransferEngine


def stock_load(engine: TransferEngine, slot: int, dst: torch.Tensor, src: torch.Tensor) -> None:
    """`TransferEngine.load`'s CUDA work (no pacing) in the stock idioms."""
    stream = engine.copy_stream
    with torch.cuda.stream(stream):
        if engine._freed[slot]:
            stream.wait_event(engine.free[slot])
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        engine.ready[slot].record()
    event = engine._own_free[slot]
    event.record(torch.cuda.current_stream())
    engine.free[slot], engine._freed[slot] = event, True


def issue_us(case: str, engine: TransferEngine, slots: list[torch.Tensor], src: torch.Tensor, loads: int) -> float:
    copy_stream = engine.copy_stream
    t0 = time.perf_counter()
    for i in range(loads):
        slot = i % len(slots)
        if case == "raw":
            with torch.cuda.stream(copy_stream):
                slots[slot].copy_(src, non_blocking=True)
        elif case == "engine":
            engine.load(slot, slots[slot], src)
            engine.release(slot)
        else:
            stock_load(engine, slot, slots[slot], src)
    us = (time.perf_counter() - t0) * 1e6 / loads
    torch.cuda.synchronize()
    engine.collect()
    return us


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=16.5, help="bytes per copy (DeepSeek-V2-Lite's bf16 expert: 16.5 MiB)")
    ap.add_argument("--loads", type=int, default=200)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_transfer_issue needs a CUDA device")
    device = torch.device("cuda", torch.cuda.current_device())
    numel = int(args.mib * (1 << 20)) // 2
    src = torch.randn(numel, dtype=torch.bfloat16).pin_memory()
    slots = [torch.empty(numel, dtype=torch.bfloat16, device=device) for _ in range(args.slots)]
    engine = TransferEngine(device, args.slots)
    cases = ["raw", "engine", "stock"]
    for case in cases:
        issue_us(case, engine, slots, src, args.loads)
    rows = []
    for r in range(args.rounds):
        for case in cases if r % 2 == 0 else cases[::-1]:
            rows.append({"case": case, "round": r, "host_us_per_load": issue_us(case, engine, slots, src, args.loads)})
    args.out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(args.out / "transfer_issue.csv", index=False)
    lines = [f"{args.loads} copies of {args.mib} MiB per round, {args.rounds} interleaved rounds, "
             f"{torch.cuda.get_device_name(device)}", "",
             "| case | host us/load median | min | max |", "|---|---|---|---|"]
    for case in cases:
        us = frame[frame.case == case].host_us_per_load
        lines.append(f"| {case} | {statistics.median(us):.1f} | {us.min():.1f} | {us.max():.1f} |")
    (args.out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

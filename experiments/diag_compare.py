"""
Comparison of two teacher-forced passes for `experiments.diag_lossless`: per forward and layer, per
position, the first differing layer and part, and the summary, CSV and Markdown built from them.

Terms as in `experiments.diag_lossless` (position, step, logit diff, margin, first layer, first part, fresh).
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import torch

from spmoe.trace.layer_probe import LayerParts, first_differing_layer, first_differing_part, layer_diffs
from spmoe.trace.lossless import step_of_positions

NUM_TABLE_ROWS = 20  # differing positions listed in table.md


@dataclass
class Forced:
    """One runtime's teacher-forced pass over one prompt: logits [N, V] (float32, host) of the N output
    tokens, per forward the decoder layers' outputs [T, H] (host, the model's dtype) and, where recorded,
    their parts (`LayerParts`; empty when not recorded)."""

    logits: torch.Tensor
    forwards: list[list[torch.Tensor]]
    parts: list[list[LayerParts]] = field(default_factory=list)



def step_layer_rows(prompt_idx: int, method: Forced, reference: Forced) -> list[dict]:
    """Per forward recorded in both passes and per decoder layer: `layer_diffs` of that forward."""
    rows = []
    for f, (m, r) in enumerate(zip(method.forwards, reference.forwards)):
        rows += [{"prompt": prompt_idx, "step": f, **row} for row in layer_diffs(m, r)]
    return rows


def forward_rows(prompt_idx: int, method: Forced, reference: Forced, layers: list[dict]) -> list[dict]:
    """Per forward recorded in both passes (`layers`: this prompt's `step_layer_rows`): its first differing
    layer and, where both passes recorded that forward's parts, the layer's first differing part and its
    max |diff| (`residual`: the layer output's) and whether the difference is fresh (see the module)."""
    by_step: dict[int, list[dict]] = {}
    for row in layers:
        by_step.setdefault(row["step"], []).append(row)
    rows = []
    differed_at: set[int] = set()  # layers whose output differed in an earlier forward
    for f in sorted(by_step):
        idx = first_differing_layer(by_step[f])
        part, part_diff, fresh = None, None, None
        if idx is not None and f < min(len(method.parts), len(reference.parts)):
            found = first_differing_part(method.parts[f][idx], reference.parts[f][idx])
            part, part_diff = found if found is not None else ("residual", by_step[f][idx]["max_abs_diff"])
            fresh = idx == 0 or idx - 1 not in differed_at
        rows.append({"prompt": prompt_idx, "step": f, "first_differing_layer": idx, "first_differing_part": part,
                     "part_max_abs_diff": part_diff, "fresh_difference": fresh})
        differed_at |= {r["layer"] for r in by_step[f] if r["max_abs_diff"] != 0}
    return rows


def position_rows(prompt_idx: int, gen, method: Forced, reference: Forced, layers: list[dict],
                  tolerance: float, relative_eps: float, forwards: list[dict] | None = None) -> list[dict]:
    """Per output position: the logit diff, argmaxes, the reference's margin, the check's verdict on the
    run's token (agree, tie or loss: `spmoe.trace.lossless.compare`) and the first differing layer of the
    forward that predicted it (`layers`: this prompt's `step_layer_rows`), with its first differing part
    (`forwards`: this prompt's `forward_rows`; empty where not recorded)."""
    m, r = method.logits, reference.logits  # [N, V] each
    diff = (m - r).abs().amax(dim=-1)  # [N]
    top2 = r.topk(2, dim=-1).values  # [N, 2]
    m_arg, r_arg = m.argmax(dim=-1), r.argmax(dim=-1)  # [N] each
    run = torch.tensor(gen.token_ids)  # [N]
    gap = top2[:, 0] - r.gather(1, run[:, None])[:, 0]  # [N], >= 0
    allowed = torch.clamp(relative_eps * top2[:, 0].abs(), min=tolerance)  # [N]
    by_step: dict[int, list[dict]] = {}
    for row in layers:
        by_step.setdefault(row["step"], []).append(row)
    parts = {r["step"]: r for r in forwards or []}
    rows = []
    for j, f in enumerate(step_of_positions(gen)):
        step_layers = by_step.get(f, [])
        idx = first_differing_layer(step_layers)
        part = parts.get(f, {})
        verdict = "agree" if r_arg[j] == run[j] else "tie" if gap[j] <= allowed[j] else "loss"
        rows.append({"prompt": prompt_idx, "position": j, "step": f, "phase": "prefill" if f == 0 else "decode",
                     "max_abs_logit_diff": float(diff[j]), "argmax_differs": bool(m_arg[j] != r_arg[j]),
                     "ref_margin": float(top2[j, 0] - top2[j, 1]), "run_token": int(run[j]),
                     "ref_argmax": int(r_arg[j]), "method_argmax": int(m_arg[j]), "ref_gap_run_token": float(gap[j]),
                     "check_verdict": verdict, "method_reproduces_run": bool(m_arg[j] == run[j]),
                     "step_layers_recorded": bool(step_layers), "first_differing_layer": idx,
                     "first_layer_max_abs_diff": None if idx is None else step_layers[idx]["max_abs_diff"],
                     "first_differing_part": part.get("first_differing_part"),
                     "part_max_abs_diff": part.get("part_max_abs_diff"),
                     "fresh_difference": part.get("fresh_difference")})
    return rows


def part_counts(forwards: list[dict]) -> dict[str, dict[str, int]]:
    """First differing part -> {"forwards": how many `forward_rows` name it, "fresh": how many of them are
    fresh}, most forwards first."""
    counts: dict[str, dict[str, int]] = {}
    for r in forwards:
        if r["first_differing_part"] is not None:
            c = counts.setdefault(r["first_differing_part"], {"forwards": 0, "fresh": 0})
            c["forwards"] += 1
            c["fresh"] += bool(r["fresh_difference"])
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]["forwards"]))


def summarize_diff(positions: list[dict], layers: list[dict]) -> dict:
    prefill = [r["max_abs_logit_diff"] for r in positions if r["phase"] == "prefill"]
    decode = [r["max_abs_logit_diff"] for r in positions if r["phase"] == "decode"]
    differing = [r for r in positions if r["max_abs_logit_diff"] != 0]
    first = differing[0] if differing else None
    prefill_first = [r for r in layers if r["max_abs_diff"] != 0]
    return {"num_positions": len(positions), "prefill_max_abs_logit_diff": max(prefill, default=0.0),
            "decode_max_abs_logit_diff": max(decode, default=0.0), "num_differing_positions": len(differing),
            "num_argmax_differs": sum(r["argmax_differs"] for r in positions),
            "num_check_ties": sum(r["check_verdict"] == "tie" for r in positions),
            "num_check_losses": sum(r["check_verdict"] == "loss" for r in positions),
            "num_method_not_reproducing_run": sum(not r["method_reproduces_run"] for r in positions),
            "first_differing_position": None if first is None else
            {k: first[k] for k in ("prompt", "position", "step", "max_abs_logit_diff", "first_differing_layer",
                                   "first_differing_part")},
            "prefill_max_abs_layer_diff": max((r["max_abs_diff"] for r in layers), default=0.0),
            "prefill_first_differing_layer": None if not prefill_first else  # rows: by prompt, then layer
            {"prompt": prefill_first[0]["prompt"], "layer": prefill_first[0]["layer"]}}


def summary_lines(s: dict) -> list[str]:
    first, layer = s["first_differing_position"], s["prefill_first_differing_layer"]
    return [
        f"prefill: max |logit diff| {s['prefill_max_abs_logit_diff']:.6g}; max |layer output diff|"
        f" {s['prefill_max_abs_layer_diff']:.6g}; first differing layer: "
        + ("none" if layer is None else f"{layer['layer']} (prompt {layer['prompt']})"),
        f"decode: max |logit diff| {s['decode_max_abs_logit_diff']:.6g}",
        f"positions with any logit difference: {s['num_differing_positions']} of {s['num_positions']};"
        f" argmax differs at {s['num_argmax_differs']}; the check on the run's tokens: {s['num_check_ties']} ties,"
        f" {s['num_check_losses']} losses",
        "first differing position: " + ("none" if first is None else
                                        f"prompt {first['prompt']} position {first['position']} (step {first['step']}),"
                                        f" |logit diff| {first['max_abs_logit_diff']:.6g}, first differing layer"
                                        f" {first['first_differing_layer']}, part {first.get('first_differing_part')}"),
        f"forced method argmax != the run's token at {s['num_method_not_reproducing_run']} positions"
        f" (0: the forced pass reproduces the run); expert misses: run {s.get('run_misses')},"
        f" forced method {s.get('forced_method_misses')}; its layers served {s.get('forced_method_layers_served')}",
        _parts_line(s.get("first_differing_part_counts")),
    ]


def _parts_line(counts: dict | None) -> str:
    head = "first differing part per forward (fresh: its first layer read identical keys/values): "
    if counts is None:
        return head + "not recorded"
    return head + (", ".join(f"{p} {c['forwards']} ({c['fresh']} fresh)" for p, c in counts.items()) or "none")


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buf.getvalue()


def table(s: dict, positions: list[dict], layers: list[dict], title: str, forwards: list[dict] | None = None) -> str:
    forwards = forwards or []
    lines = [f"# {title}", "", *[f"- {line}" for line in summary_lines(s)], "",
             "## Prefill: max |layer output diff| per layer (over prompts)", "",
             "| layer | max abs diff | last position | ref max abs |", "|---|---|---|---|"]
    for i in sorted({r["layer"] for r in layers}):
        rs = [r for r in layers if r["layer"] == i]
        lines.append(f"| {i} | {max(r['max_abs_diff'] for r in rs):.6g} | "
                     f"{max(r['last_pos_max_abs_diff'] for r in rs):.6g} | {max(r['ref_max_abs'] for r in rs):.6g} |")
    lines += ["", f"## First {NUM_TABLE_ROWS} positions with a logit difference", "",
              "| prompt | position | step | max abs logit diff | argmax differs | ref margin | first layer |"
              " layer diff | first part | part diff | fresh |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in [r for r in positions if r["max_abs_logit_diff"] != 0][:NUM_TABLE_ROWS]:
        lines.append(f"| {r['prompt']} | {r['position']} | {r['step']} | {r['max_abs_logit_diff']:.6g} | "
                     f"{r['argmax_differs']} | {r['ref_margin']:.6g} | {r['first_differing_layer']} | "
                     f"{r['first_layer_max_abs_diff']} | {r['first_differing_part']} | {r['part_max_abs_diff']} | "
                     f"{r['fresh_difference']} |")
    fresh = [r for r in forwards if r["fresh_difference"]]
    lines += ["", f"## First {NUM_TABLE_ROWS} forwards with a fresh difference", "",
              "| prompt | step | first layer | first part | part diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['step']} | {r['first_differing_layer']} | {r['first_differing_part']} | "
              f"{r['part_max_abs_diff']:.6g} |" for r in fresh[:NUM_TABLE_ROWS]]
    return "\n".join(lines) + "\n"

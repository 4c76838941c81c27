"""
Figures of the offload report (`experiments.report_offload`), drawn with matplotlib's Agg
canvas (no display) and written atomically (a temp file, then a rename).

- `plot_cutoff`: TPOT vs the fixed cutoff L* (last prefetched MoE layer), one colour per budget,
  with auto (dashed, a star at its L*) and lru (dotted) as references;
- `plot_methods`: TPOT per method, with SD and without side by side, one panel per budget.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def save(fig: Figure, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def plot_cutoff(cutoff: pd.DataFrame, labels: list[str], path: Path) -> None:
    """TPOT vs L*, one colour per budget: the fixed curve, auto (dashed, star at its L*), lru (dotted)."""
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, label in enumerate(labels):
        color = f"C{i}"
        sub = cutoff[cutoff["budget"] == label]
        curve = sub[sub["kind"].isin(["off", "fixed", "all"])].dropna(subset=["cutoff_layer", "tpot_ms"])
        if len(curve):
            curve = curve.sort_values("cutoff_layer")
            ax.plot(curve["cutoff_layer"], curve["tpot_ms"], "o-", color=color, label=f"{label}: fixed L*")
        auto = sub[(sub["kind"] == "auto") & sub["tpot_ms"].notna()]
        if len(auto):
            tpot, layer = float(auto["tpot_ms"].iloc[0]), float(auto["cutoff_layer"].iloc[0])
            known = not math.isnan(layer)
            ax.axhline(tpot, color=color, linestyle="--", linewidth=1,
                       label=f"{label}: auto" + (f" (L*={int(layer)})" if known else ""))
            if known:
                ax.plot([layer], [tpot], "*", color=color, markersize=12)
        lru = sub[(sub["kind"] == "lru") & sub["tpot_ms"].notna()]
        if len(lru):
            ax.axhline(float(lru["tpot_ms"].iloc[0]), color=color, linestyle=":", linewidth=1, label=f"{label}: lru")
    if not len(cutoff):
        ax.text(0.5, 0.5, "no cutoff cases", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("cutoff L* (last prefetched MoE layer; -1 = no prefetch)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("SP-MoE: TPOT vs prefetch cutoff")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    save(fig, path)


def plot_methods(methods: pd.DataFrame, path: Path) -> None:
    """Bars of TPOT per method (GPU-resident rows left out), SD and no-SD side by side, per budget."""
    rows = methods[(methods["method"] != "gpu_resident") & methods["tpot_ms"].notna()]
    budgets = list(dict.fromkeys(rows["budget"])) or ["(none)"]
    fig = Figure(figsize=(max(6.0, 3.5 * len(budgets)), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(budgets), squeeze=False)[0]
    for ax, budget in zip(axes, budgets):
        sub = rows[rows["budget"] == budget]
        names = list(dict.fromkeys(sub["method"]))
        for j, (sd, label) in enumerate([(False, "no SD"), (True, "SD")]):
            tpot = [sub[(sub["method"] == m) & (sub["sd"] == sd)]["tpot_ms"] for m in names]
            heights = [float(t.iloc[0]) if len(t) else 0.0 for t in tpot]
            ax.bar([i + (j - 0.5) * 0.4 for i in range(len(names))], heights, width=0.4, label=label, color=f"C{j}")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(str(budget), fontsize=9)
        ax.set_ylabel("TPOT (ms)")
        ax.grid(axis="y", alpha=0.3)
        if not names:
            ax.text(0.5, 0.5, "no method rows", ha="center", va="center", transform=ax.transAxes)
    axes[0].legend(fontsize=8)
    save(fig, path)

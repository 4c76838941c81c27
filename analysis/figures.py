"""
The paper's figures from finished runs, one function each, and the command that draws them.

    python -m analysis.figures <run or sweep dirs...> --out DIR [--only fig10,cutoff,...]

Every function takes the tidy run table (`analysis.runs.run_table`) and an output dir, writes
`<name>.png` and `<name>.pdf` (style: `analysis.plotting`) and returns the paths, or returns []
when the runs hold no data for it (the command then says so and goes on). Panels are comparison
groups (experiment, model, dataset, card, routing: `analysis.runs`); every figure names its routing source, card (with
` (emulated)`) and weights under the panels. TPOT is the median over rounds (`analysis.runs`).

| name | what | needs |
|---|---|---|
| fig10 | TPOT per method, SP-MoE's speedup over each bar | a group with >= 2 variants |
| fig11 | TPOT vs GPU memory budget (else expert slots), one line per case/method | one at >= 2 budgets (slots) |
| cutoff | TPOT vs cutoff layer L* (-1 = off), auto starred, lru dotted | spmoe at >= 2 fixed cutoffs |
| draft_length | TPOT and H2D bytes per token vs draft length k, one line per method | a method at >= 2 k |
| predictor | predictor top-1 accuracy and recall per MoE layer | traces with predictions |
| ablations | TPOT of each SP-MoE variant relative to plain `spmoe` | >= 2 spmoe variants in a group |
| breakdown | TPOT as draft / verify compute / stall / other (stacked) | traces |
| step_latency | CDF of decode step latency per variant | traces |
| table1 | acceptance rate per draft -> target pair (+ table1.md/.csv) | SD runs |
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from analysis import plotting
from analysis.plotting import (color, figure, groups, method_rank, panel_title, save, save_panels, source_of,
                               styled, title)
from analysis.report import reference_rows, to_markdown, variant_tpot
from analysis.runs import run_table
from analysis.trace import BREAKDOWN, layer_table, per_run, step_table, tpot_breakdown
from spmoe.io import write_text_atomic


def _series_name(df: pd.DataFrame) -> pd.Series:
    """A line's name when a knob is on the x-axis: the case, else the method."""
    case = df["case"] if "case" in df else pd.Series(None, index=df.index, dtype=object)
    return case.fillna(df["method"])


@styled
def fig10(runs: pd.DataFrame, out: Path, method: str = "spmoe") -> list[Path]:
    panels = [(t, g) for t, g in groups(variant_tpot(runs)) if g["variant"].nunique() >= 2]
    if not panels:
        return []
    fig, axes = figure(len(panels), width=max(4.2, 0.55 * max(len(g) for _, g in panels) + 1.5))
    for ax, (head, g) in zip(axes, panels):
        g = g.sort_values("method", key=lambda s: s.map(method_rank), kind="stable")
        ours = reference_rows(g, method, [])["tpot_ms"] if len(g) else g["tpot_ms"]
        x = np.arange(len(g))
        bars = ax.bar(x, g["tpot_ms"], color=[color(m) for m in g["method"]],
                      hatch=["//" if str(m).endswith("_nosd") or m == "gpu_resident" else "" for m in g["method"]])
        if len(ours):
            labels = [f"{t / ours.iloc[0]:.2f}x" for t in g["tpot_ms"]]
            ax.bar_label(bars, labels, fontsize=7, padding=2)
            ax.margins(y=0.15)
        ax.set_xticks(x, g["variant"], rotation=35, ha="right")
        ax.set_ylabel("TPOT (ms)")
        panel_title(ax, head)
    title(fig, f"TPOT per method; labels: {method}'s speedup over the bar (hatched: no SD)")
    return save_panels(fig, out, "fig10", panels)


def _memory_axis(g: pd.DataFrame) -> str | None:
    """fig11's x: the GPU budget where a line has >= 2 budgets, else the expert slots where one has >= 2."""
    for col in ("gpu_budget_gib", "num_slots"):
        if col in g and (g.dropna(subset=[col]).groupby("series")[col].nunique() >= 2).any():
            return col
    return None


@styled
def fig11(runs: pd.DataFrame, out: Path) -> list[Path]:
    rows = runs.dropna(subset=["tpot_ms_median"])
    rows = rows.assign(series=_series_name(rows))
    panels = [(t, g) for t, g in groups(rows, ("experiment", "model", "dataset", "routing", "runtime")) if _memory_axis(g)]
    if not panels:
        return []
    fig, axes = figure(len(panels))
    for ax, (head, g) in zip(axes, panels):
        x = _memory_axis(g)
        for name, s in sorted(g.dropna(subset=[x]).groupby("series"),
                              key=lambda kv: method_rank(kv[1]["method"].iloc[0])):
            s = s.groupby(x)["tpot_ms_median"].median()
            ax.plot(s.index, s.values, "o--" if str(name).endswith("_nosd") else "o-", color=color(name), label=name)
        ax.set_xlabel("GPU memory budget (GiB)" if x == "gpu_budget_gib" else "expert slots in GPU memory")
        ax.set_ylabel("TPOT (ms)")
        panel_title(ax, head)
        ax.legend()
    title(fig, "TPOT vs GPU memory")
    return save_panels(fig, out, "fig11", panels)


@styled
def cutoff(runs: pd.DataFrame, out: Path) -> list[Path]:
    """TPOT vs L*, one colour per GPU budget: the fixed curve, auto (dashed, a star at its L*), lru (dotted)."""
    if "cutoff_mode" not in runs:
        return []
    rows = runs.dropna(subset=["tpot_ms_median"])
    budget = rows["gpu_budget_gib"].map(lambda b: f"{b:.3g} GiB" if pd.notna(b) else "no budget")
    rows = rows.assign(budget=budget)
    fixed = rows[rows["cutoff_mode"].isin(["fixed", "off", "all"]) & rows["cutoff_layer"].notna()]
    panels = [(t, g) for t, g in groups(rows) if g.index.isin(fixed.index).sum() >= 2
              and fixed.loc[fixed.index.intersection(g.index), "cutoff_layer"].nunique() >= 2]
    if not panels:
        return []
    fig, axes = figure(len(panels), width=5.0, height=3.6)
    for ax, (head, g) in zip(axes, panels):
        for i, (label, b) in enumerate(g.groupby("budget", sort=False)):
            c = f"C{i}"
            curve = b[b.index.isin(fixed.index)].groupby("cutoff_layer")["tpot_ms_median"].median()
            ax.plot(curve.index, curve.values, "o-", color=c, label=f"{label}: fixed L*")
            auto = b[b["cutoff_mode"] == "auto"]
            if len(auto):
                tpot, layer = auto["tpot_ms_median"].median(), auto["cutoff_layer"].iloc[0]
                ax.axhline(tpot, color=c, linestyle="--", linewidth=1, label=f"{label}: auto (L*={layer:.0f})")
                ax.plot([layer], [tpot], "*", color=c, markersize=13)
            lru = b[b["method"] == "lru"]
            if len(lru):
                ax.axhline(lru["tpot_ms_median"].median(), color=c, linestyle=":", linewidth=1, label=f"{label}: lru")
        ax.set_xlabel("cutoff L* (last prefetched MoE layer; -1 = no prefetch)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("TPOT (ms)")
        panel_title(ax, head)
        ax.legend()
    title(fig, "SP-MoE: TPOT vs prefetch cutoff layer")
    return save_panels(fig, out, "cutoff", panels)


@styled
def draft_length(runs: pd.DataFrame, out: Path) -> list[Path]:
    rows = runs.dropna(subset=["num_draft_tokens", "tpot_ms_median"])
    rows = rows.assign(series=rows["method"])  # cases per k (spmoe_k1, spmoe_k3) are one line
    panels = [(t, g) for t, g in groups(rows) if (g.groupby("series")["num_draft_tokens"].nunique() >= 2).any()]
    if not panels:
        return []
    fig, axes = figure(2 * len(panels))
    for i, (head, g) in enumerate(panels):
        for name, s in g.groupby("series"):
            by_k = s.groupby("num_draft_tokens")[["tpot_ms_median", "h2d_bytes_per_token"]].median()
            axes[2 * i].plot(by_k.index, by_k["tpot_ms_median"], "o-", color=color(name), label=name)
            axes[2 * i + 1].plot(by_k.index, by_k["h2d_bytes_per_token"] / 2**20, "o-", color=color(name), label=name)
        for ax, ylabel in zip(axes[2 * i: 2 * i + 2], ("TPOT (ms)", "H2D MiB per emitted token")):
            ax.set_xlabel("draft length k")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel(ylabel)
            panel_title(ax, head)
            ax.legend()
    title(fig, "TPOT and bytes moved vs draft length")
    return save_panels(fig, out, "draft_length", panels)


@styled
def predictor(runs: pd.DataFrame, out: Path) -> list[Path]:
    layers = per_run(runs, layer_table)
    if "predictor_top1" not in layers or layers["predictor_top1"].isna().all():
        return []
    layers = layers.dropna(subset=["predictor_top1"])
    panels = groups(layers)
    most = max(g["variant"].nunique() for _, g in panels)
    fig, axes = figure(len(panels), width=5.0, height=3.2 + 0.18 * most)
    for ax, (head, g) in zip(axes, panels):
        for i, (name, s) in enumerate(g.groupby("variant", sort=False)):
            s = s.groupby("layer")[["predictor_top1", "predictor_recall"]].mean()
            ax.plot(s.index, s["predictor_top1"], "o-", color=f"C{i % 10}", label=name)
            ax.plot(s.index, s["predictor_recall"], "s--", color=f"C{i % 10}", alpha=0.6)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("MoE layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("top-1 accuracy (solid), recall (dashed)")
        panel_title(ax, head)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, fontsize=6, frameon=False)
    title(fig, "Expert predictor accuracy per layer (against the experts the target routed)")
    return save_panels(fig, out, "predictor", panels)


@styled
def ablations(runs: pd.DataFrame, out: Path, reference: str = "spmoe") -> list[Path]:
    tpot = variant_tpot(runs)
    tpot = tpot[tpot["method"].astype(str).str.startswith("spmoe")]
    panels = [(t, g) for t, g in groups(tpot) if g["variant"].nunique() >= 2]
    if not panels:
        return []
    fig, axes = figure(len(panels), width=5.5, height=0.35 * max(len(g) for _, g in panels) + 1.6)
    for ax, (head, g) in zip(axes, panels):
        g = g.sort_values("tpot_ms")
        ref = g.loc[g["variant"] == reference, "tpot_ms"]
        bars = ax.barh(g["variant"], g["tpot_ms"], color=[color(m) if v == reference else "#f4a582"
                                                          for m, v in zip(g["method"], g["variant"])])
        if len(ref):
            ax.bar_label(bars, [f"{t / ref.iloc[0]:.2f}x" for t in g["tpot_ms"]], fontsize=7, padding=2)
        ax.set_xlabel(f"TPOT (ms); labels: TPOT / TPOT({reference})")
        panel_title(ax, head)
    title(fig, "SP-MoE component ablations")
    return save_panels(fig, out, "ablations", panels)


@styled
def breakdown(runs: pd.DataFrame, out: Path) -> list[Path]:
    parts = per_run(runs, tpot_breakdown)
    if parts.empty or "tpot_ms" not in parts:
        return []
    panels = groups(parts.dropna(subset=["tpot_ms"]))
    fig, axes = figure(len(panels), width=max(5.0, 0.6 * max(g["variant"].nunique() for _, g in panels) + 1.5))
    for ax, (head, g) in zip(axes, panels):
        g = g.groupby("variant", sort=False)[list(BREAKDOWN) + ["method"]].agg(
            {**{k: "median" for k in BREAKDOWN}, "method": "first"})
        g = g.sort_values("method", key=lambda s: s.map(method_rank), kind="stable")
        bottom = np.zeros(len(g))
        for part in BREAKDOWN:
            values = g[part].to_numpy(dtype=float)
            ax.bar(g.index, values, bottom=bottom, color=plotting.BREAKDOWN_COLORS[part], label=part.removesuffix("_ms"))
            bottom += values
        ax.set_ylim(0, bottom.max() * 1.25)
        ax.set_xticks(range(len(g)), g.index, rotation=35, ha="right")
        ax.set_ylabel("ms per emitted token")
        panel_title(ax, head)
        ax.legend(ncols=4, loc="upper center")
    title(fig, "TPOT breakdown: draft, verify compute, stall on expert copies, other host time")
    return save_panels(fig, out, "breakdown", panels)


@styled
def step_latency(runs: pd.DataFrame, out: Path) -> list[Path]:
    steps = per_run(runs, step_table)
    if steps.empty or "step_ms" not in steps:
        return []
    panels = groups(steps)
    most = max(g["variant"].nunique() for _, g in panels)
    fig, axes = figure(len(panels), width=5.0, height=3.2 + 0.18 * most)
    for ax, (head, g) in zip(axes, panels):
        for name, s in g.groupby("variant", sort=False):
            ms = np.sort(s["step_ms"].to_numpy(dtype=float))
            ax.step(ms, np.arange(1, len(ms) + 1) / len(ms), where="post", label=name)
        ax.set_xlabel("decode step latency (ms)")
        ax.set_ylabel("fraction of steps")
        panel_title(ax, head)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncols=2, fontsize=6, frameon=False)
    title(fig, "Distribution of decode step latency")
    return save_panels(fig, out, "step_latency", panels)


def acceptance_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 1: acceptance per draft -> target pair and dataset (mean over runs)."""
    rows = runs.dropna(subset=["acceptance_rate"])
    if rows.empty:
        return pd.DataFrame()
    cols = {c: "mean" for c in ("acceptance_rate", "mean_acceptance_length", "predictor_top1_accuracy") if c in rows}
    table = rows.groupby(["draft", "model", "dataset", "num_draft_tokens", "routing"]).agg(
        {**cols, "run_dir": "size"}).rename(columns={"run_dir": "num_runs"})
    return table.reset_index()


@styled
def table1(runs: pd.DataFrame, out: Path) -> list[Path]:
    table = acceptance_table(runs)
    if table.empty:
        return []
    write_text_atomic(Path(out) / "table1.md", to_markdown(table))
    write_text_atomic(Path(out) / "table1.csv", table.to_csv(index=False))
    labels = table["draft"] + " -> " + table["model"] + "\n" + table["dataset"] + ", k=" + \
        table["num_draft_tokens"].map(lambda k: f"{k:.0f}")
    fig, (ax,) = figure(1, width=max(4.2, 0.9 * len(table) + 1.5))
    bars = ax.bar(range(len(table)), table["acceptance_rate"], color="#3182bd")
    ax.bar_label(bars, [f"{a:.2f}" for a in table["acceptance_rate"]], fontsize=7, padding=2)
    ax.set_xticks(range(len(table)), labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("acceptance rate")
    panel_title(ax, "Draft acceptance per draft -> target pair (Table 1)")
    return save(fig, out, "table1", source_of(runs.dropna(subset=["acceptance_rate"])))


FIGURES = {"fig10": fig10, "fig11": fig11, "cutoff": cutoff, "draft_length": draft_length, "predictor": predictor,
           "ablations": ablations, "breakdown": breakdown, "step_latency": step_latency, "table1": table1}


def draw(paths, out: Path, only: list[str] | None = None) -> dict[str, list[Path]]:
    """Each requested figure (all by default) from the runs under `paths`: {name: written paths ([] = no data)}."""
    unknown = sorted(set(only or []) - set(FIGURES))
    if unknown:
        raise ValueError(f"unknown figure(s) {unknown}; valid: {', '.join(FIGURES)}")
    runs = run_table(paths)
    if runs.empty:
        raise SystemExit(f"no finished runs (summary.json) under {[str(p) for p in paths]}")
    return {name: FIGURES[name](runs, Path(out)) for name in (only or FIGURES)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, help="run dirs, sweep dirs or folders above them")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--only", default=None, help=f"comma-separated subset of: {','.join(FIGURES)}")
    args = ap.parse_args(argv)
    written = draw(args.paths, args.out, args.only.split(",") if args.only else None)
    for name, paths in written.items():
        print(f"{name}: {', '.join(str(p) for p in paths) if paths else 'no data in these runs, skipped'}")


if __name__ == "__main__":
    main()

"""
The figures' one style: matplotlib without a display (the Agg canvas; no pyplot state), fixed
colours per method, panels per comparison group, and a source line on every figure.

- `styled`: the decorator every figure function wears, so all it draws takes STYLE.
- `figure(n)`: a Figure with n panels in a row-major grid (at most 3 per row), style applied.
- `title`, `panel_title`: titles wrapped to the figure's (panel's) width.
- `save(fig, out_dir, name, source)`: writes `name.png` and `name.pdf` atomically (temp file, then
  rename) with `source` (routing source, card with emulation, weights: `analysis.runs.describe_source`)
  printed under the panels; returns the two paths.
- `color(method)`: a method's colour, the same in every figure; unknown methods get the next free one.
- `groups(df)`: the comparison groups present (`analysis.runs.GROUP_KEYS`) and a title for each.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import matplotlib
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from analysis.runs import GROUP_KEYS

STYLE = {
    "font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "legend.fontsize": 7, "xtick.labelsize": 8,
    "ytick.labelsize": 8, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
    "axes.spines.right": False, "savefig.dpi": 150, "pdf.fonttype": 42,
}
METHOD_ORDER = ("gpu_resident", "gpu_resident_sd", "accelerate", "lru_nosd", "lru", "mixtral_offloading_nosd",
                "mixtral_offloading", "moe_infinity_nosd", "moe_infinity", "adapmoe_nosd", "adapmoe", "spmoe",
                "spmoe_plus")
_PALETTE = ("#7f7f7f", "#bcbd22", "#8c564b", "#17becf", "#1f77b4", "#9467bd", "#2ca02c", "#ff7f0e", "#d62728",
            "#e377c2", "#000000")
_COLORS = {"gpu_resident": "#7f7f7f", "gpu_resident_sd": "#bcbd22", "accelerate": "#8c564b", "lru": "#1f77b4",
           "mixtral_offloading": "#9467bd", "moe_infinity": "#2ca02c", "adapmoe": "#ff7f0e", "spmoe": "#d62728",
           "spmoe_plus": "#e377c2"}
BREAKDOWN_COLORS = {"draft_ms": "#9ecae1", "verify_ms": "#3182bd", "stall_ms": "#d62728", "other_ms": "#bdbdbd"}


def styled(draw):
    """Runs a figure function under STYLE (every text and artist it creates takes the style)."""
    @functools.wraps(draw)
    def wrapper(*args, **kwargs):
        with matplotlib.rc_context(STYLE):
            return draw(*args, **kwargs)
    return wrapper


def color(method: str) -> str:
    base = str(method).removesuffix("_nosd")
    if base not in _COLORS:
        used = set(_COLORS.values())
        free = [c for c in _PALETTE if c not in used] or list(_PALETTE)
        _COLORS[base] = free[len(_COLORS) % len(free)]
    return _COLORS[base]


def method_rank(method: str) -> tuple[int, str]:
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), str(method))


def figure(num_panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, list]:
    cols = min(max(num_panels, 1), 3)
    rows = math.ceil(max(num_panels, 1) / cols)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return fig, axes[:num_panels]


def groups(df: pd.DataFrame, keys=GROUP_KEYS) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per comparison group, in first-seen order; the experiment, the routing source and the
    runtime show only when set (routing: when not `model`; runtime: when not `eager`)."""
    keys = [k for k in keys if k in df]
    if df.empty:
        return []
    filled = df.assign(**{k: df[k].fillna("-").astype(str) for k in keys})
    out = []
    for values, rows in filled.groupby(keys, sort=False):
        named = dict(zip(keys, values if isinstance(values, tuple) else (values,)))
        parts = [named.get("model"), named.get("dataset"), named.get("card")]
        if named.get("routing") not in (None, "model"):
            parts.append(f"routing: {named['routing']}")
        if named.get("runtime") not in (None, "-", "eager"):
            parts.append(f"decode: {named['runtime']}")
        head = " | ".join(p for p in parts if p)
        if named.get("experiment") not in (None, "-"):
            head = f"{named['experiment']}: {head}"
        out.append((head, df.loc[rows.index]))
    return out


def wrap(text: str, inches: float, points: float = 9) -> str:
    """`text` broken into lines that fit `inches` at a font of `points`."""
    return "\n".join(textwrap.wrap(text, max(20, int(inches * 90 / points))))  # ~0.9 em per character, margins


def title(fig: Figure, text: str) -> None:
    fig.suptitle(wrap(text, fig.get_figwidth(), 10), fontsize=10)


def panel_title(ax, text: str) -> None:
    ax.set_title(wrap(text, ax.get_figure().get_figwidth() / max(ax.get_gridspec().ncols, 1), 9))


def source_of(*frames: pd.DataFrame) -> str:
    """The source line (`analysis.runs.describe_source`) of the rows drawn."""
    from analysis.runs import describe_source

    return describe_source(pd.concat([f for f in frames if len(f)])) if any(len(f) for f in frames) else ""


def save(fig: Figure, out_dir: Path, name: str, source: str) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if source:
        fig.supxlabel(wrap(source, fig.get_figwidth(), 7), x=0.01, ha="left", fontsize=7, color="#555555")
    paths = []
    with matplotlib.rc_context(STYLE):
        for ext in ("png", "pdf"):
            path = out_dir / f"{name}.{ext}"
            tmp = path.with_name(f".{path.stem}.tmp.{ext}")
            try:
                fig.savefig(tmp)
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
            paths.append(path)
    return paths


def save_panels(fig: Figure, out_dir: Path, name: str, panels: list) -> list[Path]:
    """`save`, labelled with the source of every panel's rows (`panels` as `groups` returns them)."""
    return save(fig, out_dir, name, source_of(*(g for _, g in panels)))

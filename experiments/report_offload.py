"""
Report on `experiments.bench_offload` results: the cutoff sweep, the ablations, the methods.

    python -m experiments.report_offload results/offload_24g results/offload_40g --out results/offload_report

Reads each result dir (`main.csv`, `runs.json` or else `partial_runs.json`, and the meta from
`meta.json` and/or the `- key: value` bullets atop `table.md`: whatever exists; cases found only
in runs.json get their main.csv columns from the summary) and writes into `--out`:
- `cutoff.csv`, `cutoff.png`, `cutoff.md`: TPOT against the fixed cutoff L*, one curve per dir,
  with `spmoe` (auto) and `lru` as reference lines; per dir the best fixed L*, auto's TPOT and
  auto / best (target <= AUTO_TARGET);
- `ablations.csv`, `ablations.md`: each `spmoe_*` variant that is not a cutoff case, with its
  TPOT ratio and delta (ms) against `spmoe`;
- `methods.csv`, `methods.md`, `methods.png`: one row per method and decoding mode (SD or not), with its TPOT
  ratio to `lru` (SD rows) or `lru_nosd` (non-SD rows).

Terms: L* is the last prefetched MoE layer, as in `spmoe.policy.cutoff.choose_cutoff`:
`spmoe_off` is L* = -1 (no prefetch), `spmoe_L<n>` is L* = n, `spmoe_all` is L* = depth - 1
(depth = number of MoE layers, from the summaries or meta `num_moe_layers`, else from the layers
`spmoe_all`'s predictor was scored on; NaN when none says). These three kinds are the "fixed"
cutoffs the best is taken over. Rows are labelled by the dir's budget (meta `budget`, else the
dir's name). A missing case or column gives NaN cells, not an error.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from experiments.report_plots import plot_cutoff, plot_methods
from spmoe.io import write_text_atomic

AUTO_TARGET = 1.05  # auto's TPOT may be at most 5% above the best fixed cutoff
MAIN_COLUMNS = ("case", "sd", "tpot_ms", "acceptance", "tau", "hit_rate", "coverage", "waste", "top1", "recall",
                "h2d_gb_per_token", "h2d_gb_per_s", "num_slots", "runtime_eff", "policy_eff", "peak_gib",
                "within_budget", "agree_ref", "agree_sd_ref", "error")
SUMMARY_KEYS = {"tpot_ms": "tpot_ms", "acceptance": "acceptance_rate", "tau": "mean_acceptance_length",
                "hit_rate": "expert_hit_rate", "coverage": "prefetch_coverage", "waste": "prefetch_waste",
                "top1": "predictor_top1_accuracy", "recall": "predictor_recall", "h2d_gb_per_s": "h2d_gb_per_s",
                "num_slots": "num_slots", "policy_eff": "policy_efficiency", "within_budget": "within_budget",
                "agree_ref": "token_agreement", "error": "error"}
ABLATIONS = {"spmoe_lru": "LRU eviction instead of layer_distance",
             "spmoe_er": "expected_reuse eviction instead of layer_distance", "spmoe_noworker": "worker thread off",
             "spmoe_nobatch": "batched I/O off", "spmoe_attn_out": "draft hidden captured at attn_out",
             "spmoe_residual": "draft hidden captured at residual"}
METHOD_ORDER = ("gpu_resident", "lru", "spmoe", "mixtral_offloading", "moe_infinity", "adapmoe")
METHOD_COLUMNS = ("tpot_ms", "hit_rate", "coverage", "waste", "h2d_gb_per_token", "runtime_eff", "policy_eff")
FIXED_CUTOFF = re.compile(r"spmoe_L(\d+)")
GIB = 2**30


@dataclass
class ResultDir:
    """One bench_offload output dir: `main` has one row per case and every MAIN_COLUMNS column."""

    path: Path
    label: str
    main: pd.DataFrame
    runs: dict[str, dict] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def row(self, case: str) -> dict | None:
        hit = self.main[self.main["case"] == case]
        return hit.iloc[0].to_dict() if len(hit) else None

    def tpot(self, case: str) -> float:
        row = self.row(case)
        return number(row["tpot_ms"]) if row is not None else float("nan")


def number(value) -> float:
    """A cell as a float; None and empty cells are NaN."""
    return float("nan") if value is None or pd.isna(value) else float(value)


# ---------------------------------------------------------------- reading

def read_meta(path: Path) -> dict:
    """meta.json merged over the `- key: value` bullets that open table.md (either may be absent)."""
    meta: dict = {}
    table = path / "table.md"
    if table.is_file():
        for line in table.read_text().splitlines():
            if not line.startswith("- "):
                break
            key, sep, value = line[2:].partition(": ")
            if sep:
                meta[key.strip()] = value.strip()
    if (path / "meta.json").is_file():
        meta.update(json.loads((path / "meta.json").read_text()))
    return meta


def row_from_summary(case: str, s: dict) -> dict:
    """A main.csv row rebuilt from a runs.json summary (no runtime_eff: it needs the bench's timings)."""
    row = {col: s.get(key) for col, key in SUMMARY_KEYS.items()}
    row["case"] = case
    if s.get("h2d_bytes_per_token") is not None:
        row["h2d_gb_per_token"] = s["h2d_bytes_per_token"] / 1e9
    if s.get("peak_gpu_bytes") is not None:
        row["peak_gib"] = s["peak_gpu_bytes"] / GIB
    return row


def load_result_dir(path: Path) -> ResultDir:
    runs_path = next((p for p in (path / "runs.json", path / "partial_runs.json") if p.is_file()), None)
    runs = json.loads(runs_path.read_text()) if runs_path else {}
    main = pd.read_csv(path / "main.csv") if (path / "main.csv").is_file() else pd.DataFrame(columns=["case"])
    if "case" not in main.columns:
        main = pd.DataFrame(columns=["case"])
    main = main[main["case"].notna()].astype({"case": str})
    extra = pd.DataFrame([row_from_summary(c, s) for c, s in runs.items() if c not in set(main["case"])])
    if len(extra):
        main = pd.concat([main.astype(object), extra], ignore_index=True) if len(main) else extra
    main = main.reindex(columns=list(dict.fromkeys([*MAIN_COLUMNS, *main.columns])))
    meta = read_meta(path)
    label = str(meta.get("budget") or meta.get("budget_hardware") or path.name)
    return ResultDir(path, label, main, runs, meta)


def load_result_dirs(paths: list[Path]) -> list[ResultDir]:
    """Load each dir; labels that clash (same budget twice) get the dir's name appended."""
    dirs = [load_result_dir(p) for p in paths]
    labels = [d.label for d in dirs]
    for d in dirs:
        if labels.count(d.label) > 1:
            d.label = f"{d.label} ({d.path.name})"
    labels = [d.label for d in dirs]
    for i, d in enumerate(dirs):
        if labels.count(d.label) > 1:  # the same dir name twice, e.g. a/offload and b/offload
            d.label = f"{d.label} #{i + 1}"
    return dirs


def budget_gib(d: ResultDir) -> float:
    found = [s["gpu_budget_bytes"] for s in d.runs.values() if s.get("gpu_budget_bytes")]
    return found[0] / GIB if found else float("nan")


def num_moe_layers(d: ResultDir) -> int | None:
    for source in (*d.runs.values(), d.meta):
        if source.get("num_moe_layers") is not None:
            return int(source["num_moe_layers"])
    by_layer = d.runs.get("spmoe_all", {}).get("predictor_top1_by_layer")
    return len(by_layer) if by_layer else None


def is_sd(case: str, value) -> bool:
    """The main.csv `sd` flag when it is there (it is empty for failed cases), else from the case name."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1")
    if value is not None and not pd.isna(value):
        return bool(value)
    return not (case.endswith("_nosd") or case in ("gpu_resident", "accelerate"))


# ---------------------------------------------------------------- tables

def cutoff_kind(case: str) -> str | None:
    if case in ("spmoe_off", "spmoe_all"):
        return case.split("_")[1]
    return "fixed" if FIXED_CUTOFF.fullmatch(case) else None


def cutoff_table(dirs: list[ResultDir]) -> pd.DataFrame:
    """One row per cutoff case (off / fixed / all), plus `spmoe` (auto) and `lru` as references."""
    rows = []
    for d in dirs:
        depth = num_moe_layers(d)
        for case in d.main["case"]:
            kind = cutoff_kind(case)
            if kind == "off":
                layer = -1
            elif kind == "all":
                layer = depth - 1 if depth else None
            elif kind == "fixed":
                layer = int(FIXED_CUTOFF.fullmatch(case).group(1))
            elif case == "spmoe":
                kind, layer = "auto", d.runs.get(case, {}).get("cutoff_layer")
            elif case == "lru":
                kind, layer = "lru", None
            else:
                continue
            rows.append({"budget": d.label, "case": case, "kind": kind,
                         "cutoff_layer": float("nan") if layer is None else layer, "tpot_ms": d.tpot(case)})
    return pd.DataFrame(rows, columns=["budget", "case", "kind", "cutoff_layer", "tpot_ms"])


def cutoff_summary(cutoff: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Per budget: the best fixed cutoff (lowest TPOT among off / fixed / all), auto, auto / best."""
    rows = []
    for label in labels:
        sub = cutoff[(cutoff["budget"] == label) & cutoff["tpot_ms"].notna()]
        fixed = sub[sub["kind"].isin(["off", "fixed", "all"])]
        best = fixed.loc[fixed["tpot_ms"].idxmin()] if len(fixed) else pd.Series(dtype=object)
        auto = sub[sub["kind"] == "auto"].iloc[0] if (sub["kind"] == "auto").any() else pd.Series(dtype=object)
        lru = sub[sub["kind"] == "lru"]
        ratio = number(auto.get("tpot_ms")) / number(best.get("tpot_ms"))
        within = None if math.isnan(ratio) else bool(ratio <= AUTO_TARGET)
        rows.append({"budget": label, "best_case": best.get("case"),
                     "best_cutoff_layer": number(best.get("cutoff_layer")), "best_tpot_ms": number(best.get("tpot_ms")),
                     "auto_cutoff_layer": number(auto.get("cutoff_layer")), "auto_tpot_ms": number(auto.get("tpot_ms")),
                     "auto_over_best": ratio, "auto_within_target": within,
                     "lru_tpot_ms": number(lru["tpot_ms"].iloc[0]) if len(lru) else float("nan")})
    return pd.DataFrame(rows)


def ablation_table(dirs: list[ResultDir]) -> pd.DataFrame:
    """Every `spmoe_*` case that is not a cutoff case, against `spmoe` of the same dir."""
    rows = []
    for d in dirs:
        ref = d.tpot("spmoe")
        cases = [c for c in d.main["case"] if c.startswith("spmoe_") and cutoff_kind(c) is None]
        cases.sort(key=lambda c: (list(ABLATIONS).index(c) if c in ABLATIONS else len(ABLATIONS), c))
        for case in cases:
            row, tpot = d.row(case), d.tpot(case)
            rows.append({"budget": d.label, "case": case, "what": ABLATIONS.get(case, ""), "tpot_ms": tpot,
                         "spmoe_tpot_ms": ref, "ratio_to_spmoe": tpot / ref, "delta_ms": tpot - ref,
                         "hit_rate": row["hit_rate"], "h2d_gb_per_token": row["h2d_gb_per_token"],
                         "error": row["error"]})
    return pd.DataFrame(rows, columns=["budget", "case", "what", "tpot_ms", "spmoe_tpot_ms", "ratio_to_spmoe",
                                       "delta_ms", "hit_rate", "h2d_gb_per_token", "error"])


def method_of(case: str) -> str:
    return "gpu_resident" if case == "gpu_resident_sd" else case.removesuffix("_nosd")


def methods_table(dirs: list[ResultDir]) -> pd.DataFrame:
    """One row per (method, SD or not): every case that is not an `spmoe_*` variant."""
    rows = []
    for d in dirs:
        ref = {True: d.tpot("lru"), False: d.tpot("lru_nosd")}
        for case in d.main["case"]:
            if case.startswith("spmoe_"):
                continue
            row = d.row(case)
            sd = is_sd(case, row["sd"])
            rows.append({"budget": d.label, "budget_gib": budget_gib(d), "method": method_of(case), "sd": sd,
                         "case": case, **{c: number(row[c]) for c in METHOD_COLUMNS},
                         "ratio_to_lru": d.tpot(case) / ref[sd], "error": row["error"]})
    budgets = [d.label for d in dirs]
    order = list(METHOD_ORDER)
    rows.sort(key=lambda r: (budgets.index(r["budget"]), order.index(r["method"]) if r["method"] in order
                             else len(order), r["method"], r["sd"]))
    return pd.DataFrame(rows, columns=["budget", "budget_gib", "method", "sd", "case", *METHOD_COLUMNS,
                                       "ratio_to_lru", "error"])


# ---------------------------------------------------------------- outputs

def markdown(df: pd.DataFrame) -> str:
    """Markdown table; long error strings are cut (the CSV keeps them whole)."""
    if "error" in df.columns:
        df = df.assign(error=df["error"].map(lambda e: e[:80] + "..." if isinstance(e, str) and len(e) > 80 else e))
    return (df.to_markdown(index=False, floatfmt=".4g") if len(df) else "(no rows)") + "\n"


def write_table(out: Path, name: str, df: pd.DataFrame, head: str) -> None:
    write_text_atomic(out / f"{name}.csv", df.to_csv(index=False, float_format="%.6g"))
    write_text_atomic(out / f"{name}.md", head + "\n\n" + markdown(df))


def write_report(dirs: list[ResultDir], out: Path) -> dict[str, pd.DataFrame]:
    labels = [d.label for d in dirs]
    cutoff = cutoff_table(dirs)
    summary = cutoff_summary(cutoff, labels)
    tables = {"cutoff": cutoff, "cutoff_summary": summary, "ablations": ablation_table(dirs),
              "methods": methods_table(dirs)}
    sources = ", ".join(f"{d.label} = `{d.path}`" for d in dirs)
    write_text_atomic(out / "cutoff.csv", cutoff.to_csv(index=False, float_format="%.6g"))
    plot_cutoff(cutoff, labels, out / "cutoff.png")
    plot_methods(tables["methods"], out / "methods.png")
    write_text_atomic(out / "cutoff.md", f"# Cutoff sweep\n\nSources: {sources}. L* = last prefetched MoE layer "
                      f"(-1 = `spmoe_off`, depth - 1 = `spmoe_all`). Target: auto / best <= {AUTO_TARGET}.\n\n"
                      + markdown(summary) + "\n![TPOT vs cutoff](cutoff.png)\n\n" + markdown(cutoff))
    missing = [c for c in ABLATIONS if not any(d.row(c) is not None for d in dirs)]
    write_table(out, "ablations", tables["ablations"], f"# Ablations against `spmoe`\n\nSources: {sources}."
                + (f" Not run: {', '.join(missing)}." if missing else ""))
    write_table(out, "methods", tables["methods"], f"# Methods\n\nSources: {sources}. `ratio_to_lru`: TPOT over "
                "`lru` (SD rows) or `lru_nosd` (non-SD rows) of the same budget.\n\n![TPOT per method](methods.png)")
    return tables


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="bench_offload result dirs")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    missing = [str(p) for p in args.dirs if not p.is_dir()]
    if missing:
        raise SystemExit(f"not a directory: {missing}")
    tables = write_report(load_result_dirs(args.dirs), args.out)
    print(tables["cutoff_summary"].to_json(orient="records"))


if __name__ == "__main__":
    main()

"""
The W&B dashboard, defined as code (`wandb-workspaces`): one workspace view over the runs that
`spmoe.tracking.log_run` logs, grouped by method.

    python -m analysis.dashboard --entity <you> [--project spmoe]            # print the view's JSON spec
    python -m analysis.dashboard --entity <you> [--project spmoe] --push     # save it to W&B (online, logged in)

Sections (every history chart uses `emitted_tokens` as its x-axis, as `log_run` defines it):
- Latency: step latency, stall and verify/draft time per step; TPOT and its breakdown per run.
- Experts: hits, misses, prefetch hits, late and wasted prefetches, H2D bytes per step; hit rate,
  prefetch coverage, predictor top-1 accuracy and H2D bytes per token per run.
- Speculation: drafted and accepted tokens per step; acceptance rate and mean acceptance length.
Building the view needs no network; only `--push` (Workspace.save) goes online.
"""

from __future__ import annotations

import argparse

X = "emitted_tokens"
SECTIONS = {
    "Latency": {"lines": [["step/latency_ms"], ["step/stall_ms"], ["step/verify_ms", "step/draft_ms"]],
                "bars": [["tpot_ms", "tpot_ms_median"], ["breakdown/draft_ms", "breakdown/verify_ms",
                                                         "breakdown/stall_ms", "breakdown/other_ms"]]},
    "Experts": {"lines": [["step/hits", "step/misses", "step/prefetch_hits"],
                          ["step/late_prefetches", "step/wasted_prefetches"], ["step/h2d_bytes"]],
                "bars": [["expert_hit_rate", "prefetch_coverage", "predictor_top1_accuracy"], ["h2d_bytes_per_token"]]},
    "Speculation": {"lines": [["step/drafted", "step/accepted"]],
                    "bars": [["acceptance_rate"], ["mean_acceptance_length"]]},
}


def build_workspace(entity: str, project: str = "spmoe", name: str = "SP-MoE runs"):
    """The workspace view (not saved): SECTIONS as line plots against emitted tokens and bar plots per run."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = []
    for title, panels in SECTIONS.items():
        lines = [wr.LinePlot(title=", ".join(y), x=X, y=y) for y in panels["lines"]]
        bars = [wr.BarPlot(title=", ".join(m), metrics=m) for m in panels["bars"]]
        sections.append(ws.Section(name=title, panels=lines + bars, is_open=True))
    settings = ws.RunsetSettings(groupby=[ws.Config("method.name")])
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections, runset_settings=settings)


def spec_json(workspace) -> str:
    """The view as W&B stores it (JSON): what `--push` would save."""
    return workspace._to_model().model_dump_json(by_alias=True, indent=1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entity", required=True)
    ap.add_argument("--project", default="spmoe")
    ap.add_argument("--name", default="SP-MoE runs")
    ap.add_argument("--push", action="store_true", help="save the view to W&B (needs network and a login)")
    args = ap.parse_args(argv)
    workspace = build_workspace(args.entity, args.project, args.name)
    if args.push:
        workspace.save()
        print(f"saved: {workspace.url}")
    else:
        print(spec_json(workspace))


if __name__ == "__main__":
    main()

"""
Resolving the `auto` presets of a run: `draft=auto`, `hardware=auto`, `routing=auto`.

Terms: a model preset names its *default draft* (the paper's pairing), its *paper card* (the
GPU the paper ran it on, emulated on a larger GPU) and its *CPU card*, and its *default routing*
when it has random weights. Resolution is a pure function of the typed config and the machine:
it returns the preset choices to compose, so the entry point composes the run as if the user had
typed them. Invariants: an explicit choice is never changed; a checkpoint or a twin always routes
with its own routers; replay is chosen only when a recorded trace exists for the dataset and k.
"""

from __future__ import annotations

import logging
from pathlib import Path

from spmoe.config import RunConfig

log = logging.getLogger(__name__)

AUTO = "auto"
TRACE_DIR = Path(__file__).resolve().parent.parent / "results" / "real_pair" / "traces"


def recorded_trace(dataset: str, num_draft_tokens: int, trace_dir: Path = TRACE_DIR) -> Path | None:
    """The real small pair's recorded routing trace for `dataset` at k draft tokens, if committed."""
    path = trace_dir / f"{dataset}_k{num_draft_tokens}.npz"
    return path if path.is_file() else None


def auto_choices(cfg: RunConfig, cuda_available: bool, trace_dir: Path = TRACE_DIR) -> dict[str, str]:
    """Overrides (`group=option` / `key=value`) that replace each `auto` choice in `cfg`."""
    choices: dict[str, str] = {}
    model = cfg.model
    if cfg.draft.name == AUTO:
        choices["draft"] = model.default_draft
    if cfg.hardware.name == AUTO:
        choices["hardware"] = model.paper_card if cuda_available else model.cpu_card
    if cfg.routing.name == AUTO:
        choices["routing"] = "model"
        if model.weights == "random" and model.default_routing == "replay":
            trace = recorded_trace(cfg.dataset.name, cfg.spec.num_draft_tokens, trace_dir)
            if trace is None:
                log.warning("no recorded routing trace for dataset=%s at k=%d under %s: routing with the model's"
                            " random routers", cfg.dataset.name, cfg.spec.num_draft_tokens, trace_dir)
            else:
                choices["routing"] = "replay"
                choices["routing.trace_path"] = str(trace)
    return choices

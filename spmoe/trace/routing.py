"""
Routing traces: what a run's target routed, what its predictors guessed and what verification
accepted, per step, in one compact versioned file (`routing_trace.npz`, numpy's compressed
archive, loadable without pickle).

Terms. A *row* is one target forward: the prefill of a prompt (T = prompt length) or one
decode/verify step (T = k + 1 positions: the last emitted token and k drafts). Layers are
*MoE-layer ordinals* 0..L-1 (the i-th layer with routed experts), so a trace does not depend on
where a family puts its dense layers; `meta["moe_layers"]` keeps the decoder-layer indices.

Arrays (S rows, N prompts, R = sum of T over rows, K = sum of drafted tokens over rows):
- `prompt_offsets [N+1]`, `prompt_tokens [.]`: each prompt's token ids (int32);
- `gen_offsets [N+1]`, `gen_tokens [.]`: each prompt's emitted token ids;
- `row_prompt, row_step, row_positions, row_drafted, row_accepted [S]`: the row's prompt,
  engine step (0 = prefill), T, drafted k (0 for prefill and plain decoding) and accepted drafts
  (-1 for prefill);
- `routes [R, L, A]` int16: the experts each position routed (top-1 first; a sentinel >= E
  means "no expert", as adaptive gating writes);
- `route_weights [R, L, A]` float32 (format 2; absent in format 1): their routing weights;
- `predicted [K, L, P]` int16: the draft-side predictor's experts for draft token j of a row,
  most probable first (-1: no prediction, e.g. past the cutoff layer);
- `lookahead [R, L, D, A]` int16: the target router of layer l+d applied to the router input of
  layer l (gate lookahead, d = 1..D), -1 where l+d is past the last layer.
Invariants (checked by `validate`): rows of a prompt are consecutive with steps 0, 1, ...;
R = sum(row_positions); K = sum(row_drafted); every row with k > 0 has T = k + 1. Contents:
`routes` in 0..E (E = the sentinel), `predicted` and `lookahead` in -1..E-1, `route_weights`
finite and >= 0, `row_accepted` -1 on prefill rows (step 0) and 0..k on the others, token ids
>= 0, offsets non-decreasing from 0 to their token array's length, `row_prompt` in 0..N-1,
`meta` naming `num_experts` >= 1 and `moe_layers` of length L.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 2  # 2 added route_weights; format 1 files still load (route_weights None)
READABLE_VERSIONS = (1, 2)
_ARRAYS = ("prompt_offsets", "prompt_tokens", "gen_offsets", "gen_tokens", "row_prompt", "row_step",
           "row_positions", "row_drafted", "row_accepted", "routes", "predicted", "lookahead")
_OPTIONAL = ("route_weights",)


class TraceError(ValueError):
    pass


@dataclass
class RoutingTrace:
    meta: dict  # format_version, model, draft, method, dataset, moe_layers, num_experts, top_k, spec_k, ...
    prompt_offsets: np.ndarray
    prompt_tokens: np.ndarray
    gen_offsets: np.ndarray
    gen_tokens: np.ndarray
    row_prompt: np.ndarray
    row_step: np.ndarray
    row_positions: np.ndarray
    row_drafted: np.ndarray
    row_accepted: np.ndarray
    routes: np.ndarray  # [R, L, A]
    predicted: np.ndarray  # [K, L, P]
    lookahead: np.ndarray  # [R, L, D, A]
    route_weights: np.ndarray | None = None  # [R, L, A]

    @property
    def num_layers(self) -> int:
        return self.routes.shape[1]

    @property
    def num_experts(self) -> int:
        return int(self.meta["num_experts"])

    @property
    def top_k(self) -> int:
        return self.routes.shape[2]

    @property
    def num_prompts(self) -> int:
        return len(self.prompt_offsets) - 1

    def prompt(self, i: int) -> list[int]:
        return self.prompt_tokens[self.prompt_offsets[i]: self.prompt_offsets[i + 1]].tolist()

    def generation(self, i: int) -> list[int]:
        return self.gen_tokens[self.gen_offsets[i]: self.gen_offsets[i + 1]].tolist()

    def rows_of(self, prompt: int) -> np.ndarray:
        return np.flatnonzero(self.row_prompt == prompt)

    def row_starts(self) -> tuple[np.ndarray, np.ndarray]:
        """(first position in `routes`, first draft token in `predicted`) of every row."""
        pos = np.concatenate([[0], np.cumsum(self.row_positions)[:-1]]).astype(np.int64)
        drafts = np.concatenate([[0], np.cumsum(self.row_drafted)[:-1]]).astype(np.int64)
        return pos, drafts

    def validate(self) -> None:
        version = self.meta.get("format_version")
        if version not in READABLE_VERSIONS:
            raise TraceError(f"routing trace format_version {version}; this code reads {list(READABLE_VERSIONS)}")
        s = len(self.row_prompt)
        if not all(len(a) == s for a in (self.row_step, self.row_positions, self.row_drafted, self.row_accepted)):
            raise TraceError("routing trace: per-row arrays differ in length")
        if self.routes.ndim != 3 or self.routes.shape[0] != int(self.row_positions.sum()):
            raise TraceError(f"routing trace: routes {self.routes.shape} do not cover sum(row_positions)"
                             f" = {int(self.row_positions.sum())} positions")
        if self.predicted.shape[0] != int(self.row_drafted.sum()):
            raise TraceError(f"routing trace: predicted {self.predicted.shape} != sum(row_drafted)")
        if self.route_weights is not None and self.route_weights.shape != self.routes.shape:
            raise TraceError(f"routing trace: route_weights {self.route_weights.shape} vs routes {self.routes.shape}")
        if self.lookahead.shape[:2] != self.routes.shape[:2]:
            raise TraceError(f"routing trace: lookahead {self.lookahead.shape} vs routes {self.routes.shape}")
        spec_rows = self.row_drafted > 0
        if np.any(self.row_positions[spec_rows] != self.row_drafted[spec_rows] + 1):
            raise TraceError("routing trace: a verify row's positions != drafted + 1")
        if np.any((self.row_prompt < 0) | (self.row_prompt >= self.num_prompts)):
            raise TraceError(f"routing trace: row_prompt outside 0..{self.num_prompts - 1}")
        for p in range(self.num_prompts):
            steps = self.row_step[self.rows_of(p)]
            if not np.array_equal(steps, np.arange(len(steps))):
                raise TraceError(f"routing trace: prompt {p}'s rows are not steps 0..{len(steps) - 1} in order")
        self._validate_contents()

    def _validate_contents(self) -> None:
        """Values, not only shapes: ids within range, weights finite, acceptance within k."""
        num_experts = self.meta.get("num_experts")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise TraceError(f"routing trace: meta num_experts={num_experts!r}; expected an integer >= 1")
        moe_layers = self.meta.get("moe_layers")
        if moe_layers is not None and len(moe_layers) != self.num_layers:
            raise TraceError(f"routing trace: meta moe_layers has {len(moe_layers)} layers, routes {self.num_layers}")
        _within("routes", self.routes, 0, num_experts, f"expert ids 0..{num_experts - 1} or the sentinel {num_experts}")
        _within("predicted", self.predicted, -1, num_experts - 1, f"expert ids 0..{num_experts - 1} or -1")
        _within("lookahead", self.lookahead, -1, num_experts - 1, f"expert ids 0..{num_experts - 1} or -1")
        if self.route_weights is not None:
            bad = ~np.isfinite(self.route_weights) | (self.route_weights < 0)
            if bad.any():
                pos = np.argwhere(bad)[0].tolist()
                raise TraceError(f"routing trace: route_weights holds {int(bad.sum())} non-finite or negative values"
                                 f" (first at [position, layer, slot] {pos}: {self.route_weights[tuple(pos)]})")
        prefill = self.row_step == 0
        if np.any(self.row_accepted[prefill] != -1) or np.any(self.row_drafted[prefill] != 0):
            raise TraceError("routing trace: a prefill row (step 0) has drafted tokens or an acceptance count != -1")
        decode_accepted, decode_drafted = self.row_accepted[~prefill], self.row_drafted[~prefill]
        bad = (decode_accepted < 0) | (decode_accepted > decode_drafted)
        if bad.any():
            r = int(np.flatnonzero(~prefill)[np.argmax(bad)])
            raise TraceError(f"routing trace: row {r} accepted {int(self.row_accepted[r])} of"
                             f" k={int(self.row_drafted[r])} drafted tokens; valid: 0..k")
        if np.any(self.row_positions < 1) or np.any(self.row_drafted < 0):
            raise TraceError("routing trace: a row with no positions or a negative drafted count")
        for name, offsets, tokens in (("prompt", self.prompt_offsets, self.prompt_tokens),
                                      ("gen", self.gen_offsets, self.gen_tokens)):
            if (len(offsets) != self.num_prompts + 1 or offsets[0] != 0 or offsets[-1] != len(tokens)
                    or np.any(np.diff(offsets) < 0)):
                raise TraceError(f"routing trace: {name}_offsets do not index {name}_tokens"
                                 f" ({self.num_prompts} prompts, {len(tokens)} tokens)")
            if len(tokens) and tokens.min() < 0:
                raise TraceError(f"routing trace: {name}_tokens holds negative token ids")

    def save(self, path: str | Path) -> None:
        """Atomically write the compressed archive."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        arrays = {k: getattr(self, k) for k in _ARRAYS + _OPTIONAL if getattr(self, k) is not None}
        np.savez_compressed(buf, meta=np.array(json.dumps(self.meta)), **arrays)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _within(name: str, values: np.ndarray, low: int, high: int, valid: str) -> None:
    if values.size and (values.min() < low or values.max() > high):
        bad = np.argwhere((values < low) | (values > high))
        pos = bad[0].tolist()
        raise TraceError(f"routing trace: {name} holds {len(bad)} ids out of range (first at {pos}:"
                         f" {int(values[tuple(pos)])}); valid: {valid}")


def load_trace(path: str | Path) -> RoutingTrace:
    """Load and validate; a run directory is accepted for its `routing_trace.npz`."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "routing_trace.npz"
    if not path.is_file():
        raise FileNotFoundError(f"routing trace {path} does not exist (record one with trace.routing=true)")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("meta", *_ARRAYS) if k not in z.files]
            if missing:
                raise TraceError(f"routing trace {path} lacks arrays {missing}")
            trace = RoutingTrace(meta=json.loads(str(z["meta"])), **{k: z[k] for k in _ARRAYS},
                                 **{k: z[k] for k in _OPTIONAL if k in z.files})
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        if isinstance(exc, TraceError):
            raise
        raise TraceError(f"routing trace {path} is not a readable .npz archive ({exc})") from None
    trace.validate()
    return trace

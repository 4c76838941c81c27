"""
The run's self-check (DESIGN.md decision 6): are the run's greedy tokens the tokens of the
GPU-resident, non-SD reference model?

Method (teacher forcing): the reference (`gpu_resident`: every expert on the device, same
weights) reads the run's own output. Per prompt, one forward over the prompt gives the reference
logits for output token 0; then each decode step of the run is repeated as the run made it: the
step's previous token and its drafts (`StepRecord.draft_ids`, rejected ones included; none
without SD), the logits of the emitted positions kept and the KV cache cropped to them, so the
reference's forward shapes and cache are the run's (a static cache of the run's capacity when the
run decoded with `hardware.decode` static or graphs: `Generation.kv_capacity`). Low-precision results depend on
shapes (a 48-token chunk and 48 one-token steps round differently, and in a random-weight model a
rounding difference flips routing near-ties and then whole tokens), so a shape-mirroring
reference agrees bit for bit wherever the run computes what the reference computes. At each *checked* position j the run's token t_j is compared with the
reference argmax a_j:
- agreement: t_j == a_j;
- *tie divergence*: t_j != a_j and the gap `logit[a_j] - logit[t_j]` <= the tolerance (the run
  took a token the reference scores within the tolerance of its best; the dtype's rounding can
  swap them). Reported with prompt, position, step and gap, and not a loss;
- *loss*: any other mismatch: `lossless = false`.
Because the reference reads the run's prefix, a tie does not desynchronise the rest of the
comparison. The tolerance is in logit units: 0 for float32/float64 (exact: every token must be
the reference argmax); for half types `DEFAULT_TOLERANCE` (bf16 0.0625) or, where the reference's
top logit is large, `HALF_ULPS` units of its last place (2 x eps x |top logit|), whichever is
larger, since rounding error scales with the logit.

Which positions are checked:
- routing=model, greedy: every emitted token (an accepted greedy draft equals the argmax too).
- routing=replay: acceptance comes from the trace, so accepted drafts are not the model's
  choice; `lossless` is null (with the reason) and only each step's last token (the recovered or
  bonus token, the one the target verified) is checked, against the reference under the same
  replayed routing, walked one committed position at a time (`replay_verified_argmax`).
- sampled runs (temperature > 0): no token-level check exists (SD consumes the random stream
  differently from plain decoding); `lossless` is null with the reason, and the distribution
  tests (tests/spec) are the check.

Runs with CPU-assisted experts (spmoe_plus) compute some experts on the host, whose arithmetic
differs from the device kernels' within rounding: their records name those experts per step and
layer (`LayerEvents.host`), and the reference recomputes exactly those on the host with the run's
function (`spmoe.plus.host_mirror`), so the same tie-aware rule applies to them (not under replay,
whose forced steps are not the run's).

Methods that change the computed function by design (spmoe_plus's `lossy_misses`) put a
`lossy_reason` in their summary totals: `declare_lossy` then reports `lossless = false` with that
reason, whatever the tokens show, and keeps the token check's agreement.

Invariants: the reference never runs the method under test (its own runtime, its own cache of
every expert); the check reads only token ids and step records, so it applies to every method.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from spmoe.config import MethodConfig
from spmoe.plus.host_mirror import HostMirror, has_host_experts
from spmoe.runtime.decoder import DynamicDecoder, StaticDecoder

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 0.0625, torch.float16: 0.0078125}
HALF_ULPS = 2  # half types: the tolerance grows with the top logit, this many units in its last place
MAX_REPORTED_SITES = 20


@dataclass
class TieDivergence:
    prompt_idx: int
    position: int  # index into the prompt's output tokens
    step: int  # engine step that emitted the token (0 = prefill)
    run_token: int
    reference_token: int
    gap: float  # reference logit of its argmax minus that of the run's token (>= 0)


@dataclass
class LosslessCheck:
    """The outcome of the self-check; `lossless` None means no token-level claim is made."""

    lossless: bool | None
    reason: str
    tolerance: float | None = None
    checked_tokens: int = 0
    agreeing_tokens: int = 0
    ties: list[TieDivergence] = field(default_factory=list)
    losses: list[TieDivergence] = field(default_factory=list)  # same fields; gap > tolerance
    replay_verified_argmax: bool | None = None
    tolerance_ulps: int | None = None  # half types: the tolerance is also this many units in the top logit's last place
    host_mirrored: int | None = None  # host experts the reference recomputed on the host (runs with CPU-assisted experts)
    host_unrouted: int | None = None  # of the run's host experts, those the reference did not route (prefix differed)

    @property
    def token_agreement(self) -> float | None:
        return self.agreeing_tokens / self.checked_tokens if self.checked_tokens else None

    def summary(self) -> dict:
        out = {"lossless": self.lossless, "lossless_reason": self.reason, "lossless_tolerance": self.tolerance,
               "tie_divergences": len(self.ties) if self.checked_tokens else None,
               "token_agreement": self.token_agreement, "lossless_checked_tokens": self.checked_tokens,
               "lossless_tolerance_ulps": self.tolerance_ulps,
               "tie_divergence_sites": [vars(t) for t in self.ties[:MAX_REPORTED_SITES]]}
        if self.replay_verified_argmax is not None:
            out["replay_verified_argmax"] = self.replay_verified_argmax
        if self.host_mirrored is not None:
            out["lossless_host_mirrored"] = self.host_mirrored
            out["lossless_host_unrouted"] = self.host_unrouted
        return out


def tolerance_for(dtype: torch.dtype) -> float:
    return DEFAULT_TOLERANCE.get(dtype, 0.0)


def relative_eps_for(dtype: torch.dtype) -> float:
    """Half types: HALF_ULPS x eps (per unit of |top logit|); 0 (exact) for float32/float64."""
    return HALF_ULPS * torch.finfo(dtype).eps if dtype in (torch.bfloat16, torch.float16) else 0.0


def compare(run_tokens: list[int], logits: torch.Tensor, positions: list[int], steps: list[int],
            tolerance: float, prompt_idx: int, check: LosslessCheck, relative_eps: float = 0.0) -> None:
    """Add the comparison of `run_tokens` [N] with reference `logits` [N, V] at `positions` to `check`.

    A mismatch is a tie when its gap <= max(tolerance, relative_eps x |top logit|)."""
    if not positions:
        return
    idx = torch.tensor(positions)
    rows = logits[idx].float()  # [P, V]
    run = torch.tensor([run_tokens[j] for j in positions])  # [P]
    top, best = rows.max(dim=-1)  # [P] each
    gap = top - rows.gather(1, run[:, None])[:, 0]  # [P], >= 0
    allowed = torch.clamp(relative_eps * top.abs(), min=tolerance)  # [P]
    check.checked_tokens += len(positions)
    check.agreeing_tokens += int((best == run).sum())
    for p in (best != run).nonzero().flatten().tolist():
        site = TieDivergence(prompt_idx, positions[p], steps[positions[p]], int(run[p]), int(best[p]), float(gap[p]))
        (check.ties if site.gap <= float(allowed[p]) else check.losses).append(site)


@dataclass
class ForcedStep:
    """One reference forward after the prefill: feed `fed_ids`, keep the logits of the first `used`
    positions (they predict the next `used` output tokens), then crop the KV cache to those."""

    fed_ids: list[int]
    used: int


@torch.inference_mode()
def forced_logits(runtime, device: torch.device, prompt_ids: list[int], token_ids: list[int],
                  steps: list[ForcedStep] | None = None, kv_capacity: int | None = None) -> torch.Tensor:
    """Reference logits [N, V] (float32, host) for each of the N output tokens given its prefix.

    Prefill over the prompt (step 0), then `steps` (default: output[:-1] in one forward), each
    forward framed by the runtime's begin_step/end_step so step listeners (replay) follow. The KV
    cache is the run's kind: dynamic, or with `kv_capacity` a static cache of that many positions
    (a run decoded with `hardware.decode` static or graphs attends over all of them, which rounds
    differently; its graphs replay the static decoder's step bit for bit)."""
    rest = token_ids[:-1]
    steps = steps if steps is not None else ([ForcedStep(rest, len(rest))] if rest else [])
    if sum(st.used for st in steps) != len(rest):
        raise ValueError(f"steps cover {sum(st.used for st in steps)} tokens, the output has {len(rest)} to feed")
    if kv_capacity is None:
        decoder = DynamicDecoder(runtime.model, device)
    else:
        decoder = StaticDecoder(runtime.model, device)
        decoder.allocate(kv_capacity)
    decoder.begin(len(prompt_ids) + len(rest) + max((len(st.fed_ids) for st in steps), default=0))
    runtime.begin_step(0)
    out = [decoder.forward(prompt_ids, 1).float().cpu()]  # [1, V]
    runtime.end_step()
    for i, st in enumerate(steps, start=1):
        length = decoder.length
        runtime.begin_step(i)
        logits = decoder.forward(st.fed_ids, len(st.fed_ids))  # [fed, V]
        runtime.end_step()
        decoder.crop(length + st.used)
        out.append(logits[: st.used].float().cpu())
    return torch.cat(out)


def mirror_steps(gen) -> list[ForcedStep] | None:
    """The run's decode steps as reference forwards: each step's previous token and its drafts
    (`draft_ids`, rejected ones included: the run's verify input), keeping the emitted count. Steps
    recorded without drafts feed the previous token and the tokens they emitted but the last. None
    when the records do not cover the output or disagree with it."""
    tokens, steps, done = gen.token_ids, [], 1  # the prefill emitted token 0
    for r in gen.records[1:]:
        n = r.num_emitted
        if n < 1 or done + n > len(tokens):
            return None
        accepted = tokens[done:done + n - 1]
        drafts = r.draft_ids if r.draft_ids is not None else accepted
        if list(drafts[:n - 1]) != accepted:
            return None
        steps.append(ForcedStep([tokens[done - 1]] + list(drafts), n))
        done += n
    return steps if done == len(tokens) else None


def step_of_positions(gen) -> list[int]:
    """The engine step that emitted each output token of `gen` (an engine Generation)."""
    steps = []
    for i, r in enumerate(gen.records):
        steps.extend([i] * r.num_emitted)
    return steps[: len(gen.token_ids)]


def verified_positions(gen) -> list[int]:
    """Each step's last emitted token: the one the target chose (recovered or bonus)."""
    out, end = [], 0
    for r in gen.records:
        end += r.num_emitted
        if r.num_emitted and end <= len(gen.token_ids):
            out.append(end - 1)
    return out


def not_checked(reason: str) -> LosslessCheck:
    return LosslessCheck(None, reason)


class ReferenceRuntime:
    """The GPU-resident reference (every expert on the device, under the session's replayed routing
    when there is one), built on first use and shared by every check of a session until `close`:
    preloading every expert is paid once, not once per checked case."""

    def __init__(self, session):
        self.session = session
        self._runtime = None
        self.replay = None  # the reference's RouteReplay under replayed routing
        self._fits: bool | None = None

    def fits(self) -> bool:
        """Whether the reference can be built on the device, judged once before it is built: once built it
        holds that memory, so asking the device again would say no for every later check."""
        if self._fits is None:
            self._fits = self._runtime is not None or self.session.reference_fits()
        return self._fits

    def get(self):
        if self._runtime is None:
            from spmoe.methods import get_strategy
            from spmoe.strategy import MethodContext
            from spmoe.trace.attach import attach_replay

            session, cfg = self.session, self.session.cfg
            hw = replace(cfg.hardware, gpu_budget_gib=None)
            ref_cfg = replace(cfg, method=MethodConfig(name="gpu_resident"), hardware=hw)
            ctx = MethodContext(ref_cfg, session.target, session.device, session.plan(hw, "gpu_resident"))
            runtime = get_strategy("gpu_resident").build(ctx)
            if session.routing_trace is not None:
                try:
                    self.replay = attach_replay(runtime, session.routing_trace, session.target.layout, False,
                                                cfg.spec.num_draft_tokens)
                except BaseException:
                    runtime.close()
                    raise
            self._runtime = runtime
        return self._runtime

    def close(self) -> None:
        if self._runtime is not None:
            self._runtime.close()
            self._runtime, self.replay = None, None

    def __enter__(self) -> "ReferenceRuntime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def check_lossless(session, gens: list, tolerance: float | None = None, temperature: float | None = None,
                   reference: ReferenceRuntime | None = None, method: MethodConfig | None = None) -> LosslessCheck:
    """Teacher-force the GPU-resident reference on the run's outputs (`gens`, one per prompt in order).
    `reference`: a shared `ReferenceRuntime` of this session (default: one built and closed here); `method`:
    the run's method config (default the session's), whose host threads the host mirror uses."""
    cfg = session.cfg
    temperature = cfg.spec.temperature if temperature is None else temperature
    if temperature > 0:
        return not_checked(f"sampled run (temperature {temperature}): SD and plain decoding consume the random"
                           " stream differently, so tokens are not comparable; the rejection sampler's"
                           " distribution tests are the check")
    if reference is None:
        with ReferenceRuntime(session) as own:
            return check_lossless(session, gens, tolerance, temperature, own, method)
    relative_eps = relative_eps_for(session.target.layout.dtype) if tolerance is None else 0.0
    tolerance = tolerance_for(session.target.layout.dtype) if tolerance is None else tolerance
    replay = session.routing_trace is not None
    runtime = reference.get()
    check = LosslessCheck(None, "", tolerance, tolerance_ulps=HALF_ULPS if relative_eps else None)
    mirror = None
    if not replay and has_host_experts(gens):
        mirror = HostMirror(runtime.model, session.target.layout.moe_layers, session.target.store,
                            (method or cfg.method).plus.host_threads)
        runtime.listeners.append(mirror)
    try:
        for i, (prompt, gen) in enumerate(zip(session.prompts, gens)):
            if reference.replay is not None:  # shared by the session's checks: each starts again at prompt 0
                reference.replay.seek(i)
            tokens = gen.token_ids
            steps = [ForcedStep([t], 1) for t in tokens[:-1]] if replay else mirror_steps(gen)
            if mirror is not None:
                mirror.follow(gen.records)
            logits = forced_logits(runtime, session.device, prompt.token_ids, tokens, steps,
                                   gen.kv_capacity)  # [N, V]
            positions = verified_positions(gen) if replay else list(range(len(tokens)))
            compare(tokens, logits, positions, step_of_positions(gen), tolerance, i, check, relative_eps)
    finally:
        if mirror is not None:
            runtime.listeners.remove(mirror)
            mirror.close()
    if mirror is not None:
        check.host_mirrored, check.host_unrouted = mirror.num_mirrored, mirror.num_unrouted
    return _conclude(check, replay)


def _conclude(check: LosslessCheck, replay: bool) -> LosslessCheck:
    tol = f"{check.tolerance}" + (f" or {check.tolerance_ulps} ulp of the top logit" if check.tolerance_ulps else "")
    ties = f"{len(check.ties)} tie divergence(s) within tolerance {tol}" if check.ties else "no divergence"
    first = check.losses[0] if check.losses else None
    loss = "" if first is None else (
        f"{len(check.losses)} divergence(s) beyond tolerance {tol}; first at prompt {first.prompt_idx}"
        f" position {first.position} (step {first.step}): token {first.run_token}, reference {first.reference_token},"
        f" gap {first.gap:.4g}")
    if replay:
        check.lossless = None
        check.replay_verified_argmax = first is None
        check.reason = ("routing replay: accepted drafts come from the trace, not from verification, so the tokens"
                        " are not the model's greedy tokens; checked instead that every verified token is the"
                        " reference argmax under the replayed routing: " + (loss or f"yes ({ties})"))
    else:
        check.lossless = first is None
        kind = "exact" if check.tolerance == 0 else "tie-aware"
        check.reason = loss or f"{kind}: every token is the reference argmax on the run's prefix ({ties})"
        if check.host_mirrored is not None:
            check.reason += (f"; the reference computed the run's {check.host_mirrored} host experts on the host"
                             + (f" ({check.host_unrouted} it did not route)" if check.host_unrouted else ""))
    if first is not None:
        log.warning("lossless check: %s", loss)
    return check


def summary_block(reference, gens: list, temperature: float) -> dict:
    """summary.json's lossless keys from a `LosslessCheck`, reference token lists, or None."""
    if isinstance(reference, LosslessCheck):
        return reference.summary()
    if reference is None:
        return not_checked("no reference was computed (check_lossless=false, or the GPU-resident reference"
                           " does not fit the device)").summary()
    if temperature > 0:
        return not_checked(f"sampled run (temperature {temperature}): tokens are not comparable with a"
                           " reference generation").summary()
    return exact_check(gens, reference).summary()


def declare_lossy(block: dict, reason: str | None) -> dict:
    """summary.json's lossless keys for a run that computes another function by design (`reason`, e.g.
    spmoe_plus's low-precision misses): `lossless` false whatever the token check found, whose
    reason and token agreement are kept. Unchanged when `reason` is None."""
    if reason is None:
        return block
    return {**block, "lossless": False, "lossless_reason": f"{reason}; token check: {block['lossless_reason']}"}


def exact_check(gens: list, reference: list[list[int]]) -> LosslessCheck:
    """Token-for-token equality with reference generations (callers that generated a reference)."""
    check = LosslessCheck(None, "", 0.0)
    for i, (gen, ref) in enumerate(zip(gens, reference)):
        check.checked_tokens += len(ref)
        check.agreeing_tokens += sum(a == b for a, b in zip(gen.token_ids, ref))
        steps, num_losses = step_of_positions(gen), len(check.losses)
        for j, (a, b) in enumerate(zip(gen.token_ids, ref)):
            if a != b:
                check.losses.append(TieDivergence(i, j, steps[j] if j < len(steps) else -1, a, b, float("nan")))
                break
        if len(gen.token_ids) != len(ref) and len(check.losses) == num_losses:  # this prompt's only divergence
            check.losses.append(TieDivergence(i, min(len(ref), len(gen.token_ids)), -1, -1, -1, float("nan")))
    check.lossless = not check.losses
    check.reason = ("exact: identical to the reference generation" if check.lossless
                    else "differs from the reference generation at prompt {0.prompt_idx} position {0.position}"
                    .format(check.losses[0]))
    return check

"""
Measuring the cutoff policy's profile (t_d, t_v, t_e, r_l of `spmoe.policy.cutoff`) and caching
it on disk by content.

Measurement (all on temporary on-demand caches that the caller frees before the run's runtime):
- t_e: one expert's host->device copy into a cache slot, the median of `REPS` synchronized copies
  after a warm-up that copies every timed expert once (so no timed copy is a first touch).
- the check: the measured pinned bandwidth W (one bulk copy of up to `BANDWIDTH_BYTES` from a
  freshly registered host buffer into the cache's storage, median of repeats; under PCIe pacing
  W is the paced bandwidth) gives the estimate B / W for an expert of B bytes. A t_e more than
  `COPY_TOLERANCE` off the estimate is measured again; if still off, the profile is *flagged*
  (kept, logged, and reported in the summary). Experts below `MIN_CHECKED_BYTES` are not checked:
  per-copy latency, not bandwidth, sets their time.
- t_d: the draft's one-token decode time per layer (median after warm-up), as the run runs it: its
  `hardware.decode` mode (CUDA-graph replays under `graphs`) and, for a quantized draft, its quantized
  sites; t_v = the full-precision draft's t_d scaled by the target's active parameters per layer, or for a
  quantized copy of the target by dtype bits / its bits (`verify_layer_ms`); r_l as
  `measure_recall` says.
Cache: `<cutoff.profile_dir>/profile-<key>.json` holds {format, key, fields, profile}; the key is
`spmoe.cache_key.content_key` of `profile_fields` (the target's and draft's resolved configs and
weight sources, twin noise, dtypes, routing source with the trace file's digest, device name, decode mode,
slots, pacing, predictor settings, seed, format version). An entry is reused only when its
stored fields equal the run's; `cutoff.reprofile=true` measures again and replaces it. Writes are
atomic (unique temp file in the same directory, then rename).
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from spmoe.cache_key import canonical, content_key, device_name, file_digest, model_config_fields, weights_source
from spmoe.config import RunConfig
from spmoe.io import write_json_atomic
from spmoe.models.experts import ExpertLayout
from spmoe.offload.cache import ExpertCache
from spmoe.offload.transfer import TransferEngine
from spmoe.policy.cutoff import PROFILE_VERSION, Profile
from spmoe.predict.recall import predictor_recall
from spmoe.runtime.decoder import make_decoder
from spmoe.trace.accuracy import trace_layer_recall

log = logging.getLogger(__name__)

REPS = 9
DRAFT_PREFIX = 16  # cached positions when the draft's one-token forward is timed
COPY_TOLERANCE = 0.25  # |t_e - B/W| / (B/W) above this is re-measured, then flagged
MIN_CHECKED_BYTES = 4 << 20
BANDWIDTH_BYTES = 256 << 20
TIMED_EXPERTS = 4


@dataclass
class ProfileRecord:
    """A profile and where it came from (for the summary)."""

    profile: Profile
    key: str
    reused: bool  # read from the cache (False: measured by this run)

    def summary(self) -> dict:
        p = self.profile
        return {"profile_key": self.key, "profile_reused": self.reused,
                "profile_expert_load_ms": p.expert_load_ms, "profile_copy_estimate_ms": p.copy_estimate_ms,
                "profile_bandwidth_gb_per_s": p.bandwidth_gb_per_s, "profile_copy_check": p.copy_check,
                "profile_flagged": p.copy_check == "flagged", "profile_draft_layer_ms": p.draft_layer_ms,
                "profile_verify_layer_ms": p.verify_layer_ms, "profile_layer_recall": p.layer_recall}


# -- keys ----------------------------------------------------------------------------------------

def routing_source(cfg: RunConfig) -> dict:
    """`model`, or `replay` with the SHA-256 of the trace file (recall depends on where routing comes from)."""
    if cfg.routing.name != "replay":
        return {"name": cfg.routing.name}
    path = Path(cfg.routing.trace_path).expanduser()
    path = path / "routing_trace.npz" if path.is_dir() else path
    return {"name": "replay", "trace_sha256": file_digest(path)}


def draft_source(cfg: RunConfig) -> dict:
    d = cfg.draft
    if d.copy_of_target:
        return {"copy_of_target": True, "quant_bits": d.quant_bits, "quant_group_size": d.quant_group_size}
    return {"dtype": d.dtype, **weights_source(d.weights, d.path, cfg.seed)}


def model_source(cfg: RunConfig) -> dict:
    m = cfg.model
    return {"dtype": m.dtype, "twin_noise": m.twin.expert_noise if m.weights == "twin" else None,
            **weights_source(m.weights, m.path, cfg.seed)}


def profile_fields(cfg: RunConfig, target_config, draft_config, device: str, slots: int, predict_top_k: int,
                   hidden_maps: bool) -> dict:
    """Everything a profile depends on (see the module docstring); `device` is the device's name."""
    hw, method = cfg.hardware, cfg.method
    return canonical({
        "format": PROFILE_VERSION,
        "model": model_config_fields(target_config),
        "model_source": model_source(cfg),
        "draft": model_config_fields(draft_config),
        "draft_source": draft_source(cfg),
        "routing": routing_source(cfg),
        "device": device,
        "decode": hw.decode,
        "slots": slots,
        "pacing_gb_per_s": hw.pcie_gb_per_s if hw.pace_pcie else None,
        "predictor": {"capture_point": method.capture_point, "predict_top_k": predict_top_k,
                      "hidden_maps": hidden_maps, "calibration_seed": cfg.seed},
    })


# -- measurement ---------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[int], None], device: torch.device, warmup: int = 3, reps: int = REPS) -> float:
    """Median wall time of `fn(i)` (each call synchronized) after `warmup` untimed calls."""
    for i in range(warmup):
        fn(i)
    _sync(device)
    times = []
    for i in range(warmup, warmup + reps):
        t0 = time.perf_counter()
        fn(i)
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_bandwidth_gb_per_s(device: torch.device, dst: torch.Tensor, nbytes: int, reps: int = 5) -> float:
    """Host->device bandwidth of one bulk copy of `nbytes` into `dst`'s memory (median of `reps`),
    from a fresh host buffer that is page-locked on CUDA: registered, or allocated pinned where registering
    fails (with most of the host's memory already pinned it can; a pageable copy runs at about half the link)."""
    dst_bytes = dst.view(-1).view(torch.uint8)[:nbytes]  # [nbytes]
    host = torch.ones(nbytes, dtype=torch.uint8)
    registered = device.type == "cuda" and int(torch.cuda.cudart().cudaHostRegister(host.data_ptr(), nbytes, 0)) == 0
    if device.type == "cuda" and not registered:
        log.info("profile: registering a %d-byte host buffer failed; measuring from a pinned allocation", nbytes)
        host = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    try:
        ms = median_ms(lambda i: dst_bytes.copy_(host, non_blocking=device.type == "cuda"), device, warmup=2, reps=reps)
    finally:
        if registered:
            torch.cuda.cudart().cudaHostUnregister(host.data_ptr())
    return nbytes / (ms * 1e6)


def check_copy(measure: Callable[[], float], expected_ms: float | None,
               tolerance: float = COPY_TOLERANCE) -> tuple[float, str]:
    """(t_e, check): measure; if off the estimate by more than `tolerance`, measure again and flag if
    still off. `expected_ms=None` skips the check."""
    t_e = measure()
    if expected_ms is None:
        return t_e, "skipped"
    if abs(t_e - expected_ms) <= tolerance * expected_ms:
        return t_e, "ok"
    log.info("profile: expert copy %.3f ms vs %.3f ms expected from the bandwidth; measuring again", t_e, expected_ms)
    t_e = measure()
    if abs(t_e - expected_ms) <= tolerance * expected_ms:
        return t_e, "ok"
    log.warning("profile flagged: an expert copy takes %.3f ms, %.0f%% off the %.3f ms that bytes / measured pinned"
                " bandwidth predicts (after re-measuring)", t_e, 100 * abs(t_e - expected_ms) / expected_ms,
                expected_ms)
    return t_e, "flagged"


@torch.inference_mode()
def draft_forward_ms(draft, device: torch.device, decode: str) -> float:
    """Median ms of one one-token draft forward after a `DRAFT_PREFIX`-token prefill, run as the run's drafter
    runs it: through `spmoe.runtime.decoder.make_decoder` in `hardware.decode` mode (under `graphs`, replays
    of the captured step), each call cropped back to the prefix."""
    decoder = make_decoder(draft, device, decode, max_graph_tokens=1)
    decoder.begin(DRAFT_PREFIX + 1)
    decoder.forward([0] * DRAFT_PREFIX, 1)

    def one_token(i: int) -> None:
        decoder.crop(DRAFT_PREFIX)
        decoder.forward([0], 1)

    return median_ms(one_token, device)


@torch.inference_mode()
def measure_profile(ctx, cache: ExpertCache, transfer: TransferEngine, layer_recall: list[float] | None = None,
                    full_precision: Callable[[], AbstractContextManager] | None = None) -> Profile:
    """The profile of `ctx`'s target and draft on `ctx.device`. Overwrites `cache`'s storage (a
    temporary cache: nothing may read it afterwards); measure recall before this. `full_precision`: for a
    quantized draft, a context that restores its full-precision sites (t_v is scaled from those)."""
    layout, draft, device = ctx.target.layout, ctx.draft, ctx.device
    timed = layout.keys[:TIMED_EXPERTS]

    def load(i: int) -> None:
        transfer.load(0, cache.slot(0), ctx.target.store.flat(timed[i % len(timed)]))

    hw = ctx.cfg.hardware
    nbytes = min(cache.nbytes, max(BANDWIDTH_BYTES, layout.expert_bytes))
    bandwidth = measure_bandwidth_gb_per_s(device, cache.storage, nbytes)
    if hw.pace_pcie and hw.pcie_gb_per_s:
        bandwidth = min(bandwidth, hw.pcie_gb_per_s)
    estimate_ms = layout.expert_bytes / (bandwidth * 1e6)
    checked = estimate_ms if layout.expert_bytes >= MIN_CHECKED_BYTES else None
    expert_ms, check = check_copy(lambda: median_ms(load, device, warmup=len(timed)), checked)
    transfer.collect()
    num_layers = len(draft.model.layers)
    draft_layer_ms = draft_forward_ms(draft, device, ctx.cfg.hardware.decode) / num_layers
    with full_precision() if full_precision is not None else nullcontext():
        fp_layer_ms = (draft_layer_ms if full_precision is None else
                       draft_forward_ms(draft, device, ctx.cfg.hardware.decode) / num_layers)
        copy_bits = ctx.cfg.draft.quant_bits if ctx.cfg.draft.copy_of_target else None
        verify_ms = verify_layer_ms(fp_layer_ms, draft.model.layers[0], layout, copy_bits)
    return Profile(draft_layer_ms, verify_ms, expert_ms, len(layout.moe_layers),
                   layout.num_experts, layout.top_k, cache.num_slots, layer_recall, layout.expert_bytes,
                   bandwidth, estimate_ms, check)


def verify_layer_ms(fp_draft_layer_ms: float, draft_layer: torch.nn.Module, layout: ExpertLayout,
                    copy_bits: int | None) -> float:
    """t_v from the full-precision draft's t_d per layer (decode reads weights, so time scales with bytes read).
    A quantized copy of the target (`copy_bits`) runs the target's own layers on copy_bits / dtype bits of their
    bytes: t_v = t_d x dtype bits / copy_bits (its weights are buffers, not parameters, so the dense rule below
    would count none). A dense draft's layer: t_d x (its attention + the target's top_k routed experts) / (its
    attention + MLP), counted as parameters."""
    if copy_bits is not None:
        return fp_draft_layer_ms * torch.finfo(layout.dtype).bits / copy_bits
    attn = sum(p.numel() for p in draft_layer.self_attn.parameters())
    ffn = sum(p.numel() for p in draft_layer.mlp.parameters())
    return fp_draft_layer_ms * (attn + layout.top_k * layout.expert_numel) / (attn + ffn)


@torch.inference_mode()
def measure_recall(ctx, maps: dict[int, torch.Tensor] | None) -> list[float] | None:
    """r_l per MoE layer: from the routing trace under `routing=replay`, else on calibration sequences."""
    cfg, layout = ctx.cfg, ctx.target.layout
    if ctx.routing_trace is not None:
        return trace_layer_recall(ctx.routing_trace, len(layout.moe_layers))
    vocab = ctx.target.model.config.vocab_size
    gen = torch.Generator().manual_seed(cfg.seed + 23456)  # never the evaluation prompts, nor the maps' sequences
    sequences = torch.randint(3, vocab, (4, 64), generator=gen).tolist()
    return predictor_recall(ctx.draft, ctx.target.model, list(layout.moe_layers), sequences,
                            cfg.method.capture_point, cfg.method.predict_top_k or layout.top_k, maps, ctx.device)


# -- the cache -----------------------------------------------------------------------------------

def profile_path(profile_dir: str | Path, key: str) -> Path:
    return Path(profile_dir).expanduser() / f"profile-{key}.json"


def load_profile(path: Path, fields: dict | None = None) -> Profile | None:
    """The profile at `path`, or None (missing, or stored for other `fields`). Reads the keyed entry
    format and, for old files, a bare profile dict (v1 had no `layer_recall`)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    if "profile" not in data:
        return Profile(**data)
    if fields is not None and data.get("fields") != canonical(fields):
        return None
    return Profile(**data["profile"])


def save_profile(path: Path, profile: Profile, fields: dict | None = None) -> None:
    entry = {"format": PROFILE_VERSION, "key": content_key(fields) if fields is not None else None,
             "fields": canonical(fields), "profile": asdict(profile)}
    write_json_atomic(path, entry)


def load_or_measure(ctx, fields: dict, measure: Callable[[], Profile]) -> ProfileRecord:
    """The cached profile for `fields`, or (absent, or `cutoff.reprofile`) a fresh one, saved."""
    cutoff = ctx.cfg.method.cutoff
    key = content_key(fields)
    path = profile_path(cutoff.profile_dir, key)
    profile = None if cutoff.reprofile else load_profile(path, fields)
    if profile is not None:
        log.info("profile %s reused from %s", key, path)
        return ProfileRecord(profile, key, reused=True)
    profile = measure()
    save_profile(path, profile, fields)
    log.info("profiled %s (%s): %s", key, "re-taken on request" if cutoff.reprofile else "new", profile)
    return ProfileRecord(profile, key, reused=False)


def context_fields(ctx, slots: int, hidden_maps: bool) -> dict:
    """`profile_fields` of a method context."""
    top_k = ctx.cfg.method.predict_top_k or ctx.target.layout.top_k
    return profile_fields(ctx.cfg, ctx.target.model.config, ctx.draft.config, device_name(ctx.device), slots, top_k,
                          hidden_maps)

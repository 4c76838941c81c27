"""
Host memory: what a run needs on the host, what the machine has, and the refusal when it is short.

Needed = the expert store (every routed expert, exactly sized) + on a CPU device the non-expert
weights, the draft, KV caches and activations (they live in host RAM there) + a fixed allowance for
the Python process and libraries. Available = `hardware.host_memory_gib` when set, else the larger
of `MemTotal` and the memory blocks the kernel lists under /sys/devices/system/memory (online or
not): on VMs whose RAM grows on use, MemTotal starts far below the limit. The check runs on the
plan, before anything large is allocated.
"""

from __future__ import annotations

from pathlib import Path

from spmoe.offload.budget import MemoryPlan

GIB = 2**30
PROCESS_ALLOWANCE_BYTES = 2 * GIB  # interpreter, torch, transformers, tokenizer, prompts


class HostMemoryError(MemoryError):
    pass


def host_bytes_needed(plan: MemoryPlan, device_type: str) -> int:
    need = plan.num_experts_total * plan.expert_bytes + PROCESS_ALLOWANCE_BYTES
    if device_type == "cpu":
        need += plan.non_expert_bytes + plan.draft_bytes + plan.kv_bytes + plan.activation_bytes
    return need


def _meminfo_bytes(key: str, path: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _sysfs_memory_bytes(root: Path = Path("/sys/devices/system/memory")) -> int | None:
    try:
        block_bytes = int((root / "block_size_bytes").read_text().strip(), 16)
        return block_bytes * sum(1 for p in root.glob("memory[0-9]*"))
    except (OSError, ValueError):
        return None


def host_bytes_available(host_memory_gib: float | None) -> int | None:
    if host_memory_gib is not None:
        return int(host_memory_gib * GIB)
    found = [b for b in (_meminfo_bytes("MemTotal"), _sysfs_memory_bytes()) if b]
    return max(found) if found else None


def check_host_memory(plan: MemoryPlan, device_type: str, host_memory_gib: float | None, hint: str) -> None:
    """Raise HostMemoryError (one line: need, have, a command that runs here) when the plan does not fit."""
    need = host_bytes_needed(plan, device_type)
    have = host_bytes_available(host_memory_gib)
    if have is not None and need > have:
        raise HostMemoryError(
            f"this run needs {need / GIB:.1f} GiB of host memory ({plan.num_experts_total} experts x"
            f" {plan.expert_bytes / GIB:.3f} GiB in the expert store + the process) but this machine has"
            f" {have / GIB:.1f} GiB (set hardware.host_memory_gib if that is wrong). {hint}")

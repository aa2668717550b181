"""How many intra-op threads torch uses for CPU inference: by default one fewer than this process's CPUs.

torch's default is one thread per core. A pipeline call on CPU then needs every core at each parallel region,
and on a host where the API, the event loop, storage and PNG encoding also run, whichever thread is
descheduled holds the others up: on the 2-core development machine a 64-burst ran at 26 img/s with 2 threads
and 37.5 img/s with 1 (bench_serving, docs/benchmarks.md). GPU workers are left alone (their CPU threads do
little). "The CPUs this process has" honours both the affinity mask and a cgroup v2 CPU quota (a Kubernetes
CPU limit), whichever is smaller.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import structlog
import torch

log = structlog.get_logger(__name__)

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 quota where one is set."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota(cpu_max)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _cgroup_quota(cpu_max: Path) -> int | None:
    """`cpu.max` reads "<quota> <period>" or "max <period>"; the quota in whole CPUs, rounded up."""
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, math.ceil(int(quota) / int(period)))
    except (ValueError, ZeroDivisionError):
        return None


def cpu_inference_threads(requested: int, *, cpus: int) -> int:
    """`requested` threads, or for 0 one fewer than `cpus` (at least one)."""
    if requested < 0:
        raise ValueError(f"torch threads must be 0 (automatic) or more, got {requested}")
    return requested or max(1, cpus - 1)


def configure_cpu_inference(device: torch.device, requested: int = 0) -> int | None:
    """Set torch's intra-op threads for a CPU device (returns them); None and nothing changed for GPUs."""
    if device.type != "cpu":
        return None
    cpus = available_cpus()
    threads = cpu_inference_threads(requested, cpus=cpus)
    torch.set_num_threads(threads)
    log.info("cpu_inference_threads", threads=threads, cpus=cpus)
    return threads

"""torch's intra-op threads for CPU inference: one fewer than the process's CPUs, cgroup quotas honoured."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from service.generation.cpu_threads import (
    available_cpus,
    configure_cpu_inference,
    cpu_inference_threads,
)


@pytest.fixture
def torch_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("requested", "cpus", "expected"), [(0, 2, 1), (0, 1, 1), (0, 16, 15), (3, 2, 3)])
def test_threads_leave_one_cpu_for_the_rest_unless_asked_otherwise(
    requested: int, cpus: int, expected: int
) -> None:
    assert cpu_inference_threads(requested, cpus=cpus) == expected


def test_a_negative_thread_count_is_refused() -> None:
    with pytest.raises(ValueError, match="0 \\(automatic\\) or more"):
        cpu_inference_threads(-1, cpus=4)


@pytest.mark.parametrize(
    ("cpu_max", "affinity_cap"),
    [("max 100000\n", None), ("150000 100000\n", 2), ("50000 100000\n", 1), ("garbage", None)],
)
def test_a_cgroup_quota_caps_the_cpus(tmp_path: Path, cpu_max: str, affinity_cap: int | None) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    unlimited = available_cpus(tmp_path / "missing")
    expected = unlimited if affinity_cap is None else min(unlimited, affinity_cap)
    assert available_cpus(path) == expected


def test_cpu_inference_sets_torchs_threads(torch_threads: None) -> None:
    assert configure_cpu_inference(torch.device("cpu"), 1) == 1
    assert torch.get_num_threads() == 1
    automatic = configure_cpu_inference(torch.device("cpu"))
    assert automatic == max(1, available_cpus() - 1)
    assert torch.get_num_threads() == automatic


def test_a_gpu_device_is_left_alone(torch_threads: None) -> None:
    before = torch.get_num_threads()
    assert configure_cpu_inference(torch.device("cuda"), 1) is None
    assert torch.get_num_threads() == before

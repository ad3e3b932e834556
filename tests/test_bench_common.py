"""``bench.common.device_busy_s``: kernel time counted once."""

from __future__ import annotations

from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.common import device_busy_s


def test_device_busy_counts_each_kernel_once() -> None:
    # A profiler table holds the CPU op that launched a kernel (carrying the kernel's time as
    # its own "self" device time) and the kernel itself; only the kernel counts.
    table = [
        SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=3_000_000),
        SimpleNamespace(
            device_type=DeviceType.CUDA, self_device_time_total=3_000_000, is_user_annotation=False
        ),
        SimpleNamespace(
            device_type=DeviceType.CUDA, self_device_time_total=9_000_000, is_user_annotation=True
        ),
    ]
    assert device_busy_s(table) == 3.0

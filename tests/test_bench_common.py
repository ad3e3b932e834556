"""``bench.common``: kernel time counted once, garbage collections counted."""

from __future__ import annotations

import gc
from types import SimpleNamespace

from torch.autograd import DeviceType

from bench.common import GcWatch, device_busy_s


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


def test_gc_watch_counts_full_collections_only_inside_its_block() -> None:
    with GcWatch() as watch:
        gc.collect(0)
        gc.collect(1)
        assert watch.full == 0
        gc.collect()
        gc.collect(2)
    assert watch.full == 2
    assert watch.seconds > 0
    assert watch not in gc.callbacks
    gc.collect()  # after the block: not counted
    assert watch.full == 2

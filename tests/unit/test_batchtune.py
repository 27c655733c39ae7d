"""Batch-size warm-up (infogrowth.batchtune) with a simulated device: stops at the cap, before
the memory budget, at a (fake) out-of-memory error, or when doubling stops paying."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from infogrowth.batchtune import Trial, is_oom, tune_batch_size

GIB = 1 << 30


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError (matched by name)."""


def device(
    *, per_item: int = 10 << 20, ooms_at: int | None = None, saturate: int = 1 << 30
) -> tuple[Callable[[int], Trial], list[int]]:
    """A simulated GPU: peak = 1 GiB + b * per_item; items/s grow with b up to ``saturate``;
    batches of ``ooms_at`` or more raise a CUDA OOM."""
    tried: list[int] = []

    def trial(b: int) -> Trial:
        tried.append(b)
        if ooms_at is not None and b >= ooms_at:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        rate = 1000.0 * min(b, saturate)  # items/s
        return Trial(seconds=b / rate, peak_bytes=GIB + b * per_item)

    return trial, tried


def test_doubles_up_to_the_cap() -> None:
    trial, tried = device()
    res = tune_batch_size(trial, start=32, cap=512, budget_bytes=100 * GIB, base_bytes=GIB)
    assert (res.batch_size, res.reason) == (512, "cap")
    assert tried == [32, 64, 128, 256, 512]


def test_stops_before_the_predicted_peak_passes_the_budget() -> None:
    """256 items need 1 GiB + 2.5 GiB; 512 would need 6 GiB > 5 GiB: 512 is never run."""
    trial, tried = device(per_item=10 << 20)
    res = tune_batch_size(trial, start=64, cap=4096, budget_bytes=5 * GIB, base_bytes=GIB)
    assert (res.batch_size, res.reason) == (256, "memory")
    assert tried == [64, 128, 256]


def test_an_out_of_memory_trial_keeps_the_last_size_that_worked() -> None:
    trial, tried = device(ooms_at=512)
    res = tune_batch_size(trial, start=64, cap=4096, budget_bytes=100 * GIB, base_bytes=GIB)
    assert (res.batch_size, res.reason) == (256, "out of memory")
    assert tried == [64, 128, 256, 512]
    assert [b for b, _, _ in res.tried] == [64, 128, 256]


def test_first_size_out_of_memory_halves_until_one_fits() -> None:
    trial, tried = device(ooms_at=40)
    res = tune_batch_size(trial, start=128, cap=1024, budget_bytes=100 * GIB, base_bytes=GIB)
    assert res.batch_size == 32
    assert tried[:3] == [128, 64, 32]


def test_nothing_fits_raises() -> None:
    trial, _ = device(ooms_at=1)
    with pytest.raises(OutOfMemoryError):
        tune_batch_size(trial, start=8, cap=64, budget_bytes=100 * GIB)


def test_stops_when_doubling_no_longer_pays() -> None:
    trial, tried = device(saturate=128)
    res = tune_batch_size(trial, start=32, cap=4096, budget_bytes=100 * GIB, base_bytes=GIB)
    assert (res.batch_size, res.reason) == (128, "no gain")
    assert tried == [32, 64, 128, 256]


def test_other_errors_propagate() -> None:
    def trial(b: int) -> Trial:
        if b > 16:
            raise ValueError("model bug")
        return Trial(0.01, GIB)

    with pytest.raises(ValueError, match="model bug"):
        tune_batch_size(trial, start=16, cap=64, budget_bytes=100 * GIB)


def test_start_above_cap_is_clamped_and_sizes_must_be_positive() -> None:
    trial, tried = device()
    assert tune_batch_size(trial, start=900, cap=100, budget_bytes=100 * GIB).batch_size == 100
    assert tried == [100]
    with pytest.raises(ValueError):
        tune_batch_size(trial, start=0, cap=10, budget_bytes=GIB)


def test_is_oom() -> None:
    assert is_oom(OutOfMemoryError("x"))
    assert is_oom(RuntimeError("CUDA error: out of memory"))
    assert not is_oom(RuntimeError("shape mismatch"))
    assert not is_oom(ValueError("out of memory"))

"""The multi-process harness itself: a rank stuck outside any collective fails the test with its stack."""

from __future__ import annotations

import time

import pytest
from _spawn import run_distributed


def _stuck_on_rank_1(rank: int, world_size: int) -> int:
    if rank == 1:
        time.sleep(600)  # stands in for a wait no collective timeout covers (a build lock, a dead NFS)
    return rank


def test_a_rank_past_the_deadline_fails_with_its_stack(capfd):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"ranks \[1\] still running after 5 s"):
        run_distributed(_stuck_on_rank_1, 2, init=False, deadline_s=5)
    assert time.monotonic() - start < 60
    assert "_stuck_on_rank_1" in capfd.readouterr().err

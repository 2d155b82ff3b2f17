"""The test harness's process runner (tests/dist_utils.run_ranks): results by rank, and a rank that dies without a
result or never answers is an error naming it, not a wait that only the test runner's timeout ends."""
import os
import time

import pytest
from dist_utils import run_ranks


def _rank_times_ten(rank, world):
    return rank * 10


def _rank_one_dies(rank, world):
    if rank == 1:
        os._exit(7)  # no traceback, no result: as a crash in native code
    time.sleep(30)
    return rank


def _hangs(rank, world):
    time.sleep(60)


def test_results_dead_ranks_and_hangs():
    assert run_ranks(_rank_times_ten, 2) == [0, 10]
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code 7 without a result"):
        run_ranks(_rank_one_dies, 2)
    with pytest.raises(RuntimeError, match=r"no result from ranks \[0\] in 3 s"):
        run_ranks(_hangs, 1, result_timeout=3)
    assert time.monotonic() - t0 < 25  # neither waited for the sleeping ranks

"""Fixtures shared by the test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """torch.set_num_threads(1) for a module, restored after it.

    For modules of small tensors: on a busy 2-core machine an op split over 2 threads waits for a time slice of the
    other core (measured 100x slower in test_data.py), and the 2-thread OpenMP pool intermittently spins into
    5-15x slowdowns (test_models.py: 25 s with one thread, 22-344 s with two). Loader workers run single-threaded
    anyway; the main process matches them.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

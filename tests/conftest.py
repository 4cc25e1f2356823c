"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """One torch thread for a module of tiny tensors: they gain nothing from intra-op threads, and
    on shared cores OpenMP spin-waiting makes them many times slower; restored after the module.
    A module asks for it with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture
def two_torch_threads():
    """Run the test with 2 torch threads, then restore the count. A CPU reduction's result depends on
    how many threads split it, so numbers pinned on 2 threads need it; an earlier test (the CLI's
    ``--threads``) may have left another count behind."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """Run the test with 1 torch thread, then restore the count (tiny tensors: one thread is faster
    than several contending ones, and what it computes does not depend on the machine's cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

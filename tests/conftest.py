"""Fixtures shared by the test modules (helpers that build tiny models live in `models_util`,
`tiny_denoiser` and `control_toy`)."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread, and a busy machine cannot stall it at an OpenMP barrier.
    A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""Fixtures shared by the test modules (helpers that build tiny models live in `models_util`,
`tiny_denoiser` and `control_toy`)."""

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_thread_session():
    """One torch thread from the start, so module-scoped fixtures build on one thread too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_sessionstart(session):
    """Say the order's seed even under `-q` (which hides pytest-randomly's header line), so a failure
    that depends on the order can be replayed."""
    seed = getattr(session.config.option, "randomly_seed", None)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and isinstance(seed, int) and session.config.pluginmanager.has_plugin("randomly"):
        reporter.write_line(
            f"random order: -p randomly --randomly-seed={seed} replays it (-p no:randomly: file order)"
        )


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same torch generator state, whichever tests ran before it
    (pytest-randomly reseeds `random` and numpy, not torch)."""
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def pinned_threads():
    """Every test runs on one torch thread, whatever the machine's core count, and leaves the count
    as it found it: a test that sets its own count (or a module that asks for `one_thread`) still may,
    and the next test does not inherit it. Tiny models run fastest on one thread, results cannot vary
    with the machine's reduction order, and a busy machine cannot stall a test at an OpenMP barrier."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """One thread for a module's fixtures, kept for modules that ask for it by name (the session and
    per-test pins above already give every test one). A module opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

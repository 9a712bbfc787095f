"""pytest fixtures and hooks; the helpers the tests share are in helpers.py."""

import os

import pytest
import torch
import torch.distributed as dist
from helpers import DEVICES, Emulated, load_emulation


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def one_rank(tmp_path):
    """A gloo process group of this process alone (world size 1), destroyed after the test."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="session")
def emu():
    if os.environ.get("MARGINOPS_SKIP_EMULATION") == "1":
        pytest.skip("MARGINOPS_SKIP_EMULATION=1")
    return Emulated(load_emulation())


# -- skips: with MARGINOPS_NO_SKIPS=1 (set by .ci/run) a skip whose reason does not name a GPU fails
# the session, so a missing test dependency or a broken fixture cannot pass CI as "skipped".
_skips = []


def pytest_runtest_logreport(report):
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _skips.append((report.nodeid, reason))


def pytest_sessionfinish(session, exitstatus):
    if os.environ.get("MARGINOPS_NO_SKIPS") != "1":
        return
    bad = [(node, reason) for node, reason in _skips if "GPU" not in reason]
    if bad:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        reporter.write_line(
            f"MARGINOPS_NO_SKIPS=1: {len(bad)} test(s) skipped for a reason other than a missing GPU:", red=True
        )
        for node, reason in bad:
            reporter.write_line(f"  {node}: {reason}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(params=[1, 2], ids=["threads1", "threads2"])
def threads(request):
    """torch's CPU thread count set to 1, then 2, for the test (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(old)

"""The IPsec tier's VM boots when the session starts, in parallel with the host tests.

Booting Debian's kernel under TCG, loading every program and starting two nodes' services
take minutes in which the host's tests leave a core mostly idle. So once collection has
selected a test of `test_ipsec_vm.py` (as root, on a machine that can boot a VM), the VM
boots niced; the guest sets up and holds (`tests.vm.ipsec_guest --hold`). When the VM tests
start, the `ipsec_vm` fixture renices it and lets its timed phases go. Its process group is
killed when the session ends, however it ends; if the host process dies unannounced, the
held guest gives up once the host's heartbeat stops.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from tests.vm.ipsec_boot import IpsecVm
from tests.vm.vm import unavailable

BACKGROUND_NICE = 19  # the host's timed tests come first while they run
VM_TEST_FILE = Path(__file__).resolve().with_name("test_ipsec_vm.py")


_EARLY = pytest.StashKey[IpsecVm]()
_MADE = pytest.StashKey[list[IpsecVm]]()


def _selected(session: pytest.Session) -> bool:
    """A test of the VM tier is to run, and could: root, a bootable VM, not only collecting."""
    config = session.config
    if config.option.collectonly or (session.testsfailed and not config.option.continue_on_collection_errors):
        return False
    if not any(item.path.resolve() == VM_TEST_FILE for item in session.items):
        return False
    return os.geteuid() == 0 and not unavailable()


def _boot(config: pytest.Config, nice: int) -> IpsecVm:
    vm = IpsecVm(Path(tempfile.mkdtemp(prefix="weir-ipsec-vm-")), nice)
    atexit.register(vm.stop)  # should pytest_sessionfinish never come
    config.stash.setdefault(_MADE, []).append(vm)
    return vm


def pytest_collection_finish(session: pytest.Session) -> None:
    if not _selected(session):
        return
    vm = session.config.stash[_EARLY] = _boot(session.config, BACKGROUND_NICE)
    previous = signal.getsignal(signal.SIGTERM) or signal.SIG_DFL

    def terminated(signum: int, frame: FrameType | None) -> None:
        """SIGTERM (a CI run cancelled) would end pytest without its finalisers: stop the VM at once,
        then end as on Ctrl-C, so the tests' own clean-up runs; a second SIGTERM ends it outright."""
        vm.stop()
        signal.signal(signal.SIGTERM, previous)
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, terminated)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Every VM ends with the session; its files stay only when a test failed."""
    for vm in session.config.stash.get(_MADE, []):
        vm.stop()
        if not session.testsfailed:
            shutil.rmtree(vm.rwdir, ignore_errors=True)


@pytest.fixture(scope="session")
def ipsec_vm(request: pytest.FixtureRequest) -> Iterator[IpsecVm]:
    """The VM booted at the session's start (or, if none was, one booted now), let go at full priority.

    Skipped only when no VM can be booted here, with the reason. A guest that ended before
    its hold while niced is reported as a warning and booted again at full priority: on a
    loaded machine a starved guest can outlast its own timeouts.
    """
    reason = unavailable()
    if reason:
        pytest.skip(f"no VM for the IPsec tier: {reason}")
    vm = request.config.stash.get(_EARLY, None)
    if vm is not None and vm.failed_early():
        log = vm.rwdir / "guest.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        warnings.warn(
            f"the VM booted niced at the session's start ended before its tests ({vm.rwdir}); "
            f"booting it again:\n{tail}",
            pytest.PytestWarning,
            stacklevel=1,
        )
        vm = None
    if vm is None:
        vm = _boot(request.config, 0)
    vm.go()
    yield vm
    vm.stop()

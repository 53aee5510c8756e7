"""The IPsec tier's VM: booted at once, set up, then holding before its timed phases until `go()`.

The host boots it niced while its own tests run (tests/vm/conftest.py) and lets it go at
full priority when the VM tests start. A heartbeat file tells the held guest the host
still lives: if the host process dies unannounced, the guest gives up and powers off.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from pathlib import Path

from tests.vm.vm import Vm

HEARTBEAT = 5.0  # seconds between the host's heartbeats (the guest gives up after 300 s without one)


class IpsecVm:
    """The IPsec tier's guest: booted at once, holding before its timed phases until `go()`."""

    def __init__(self, rwdir: Path, nice: int) -> None:
        start = float(os.environ.get("WEIR_VM_START_TIMEOUT", "400"))  # seconds one service may take to start
        body = f"exec env WEIR_VM_START_TIMEOUT={start} {sys.executable} -u -m tests.vm.ipsec_guest {rwdir} --hold"
        self.rwdir = rwdir
        self.nice = nice
        self.booted = time.monotonic()
        self._stopped = threading.Event()
        self.vm = Vm(body, rwdir, nice=nice)
        self._beat = threading.Thread(target=self._heartbeat, name="ipsec-vm-heartbeat", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        count = 0
        while not self._stopped.wait(HEARTBEAT):
            count += 1
            with contextlib.suppress(OSError):  # its directory goes once the tests are done
                (self.rwdir / "host-alive").write_text(str(count))

    @property
    def result(self) -> Path:
        return self.rwdir / "result.json"

    def failed_early(self) -> bool:
        """Whether the guest ended before reaching its hold (before `setup_seconds` was saved)."""
        return not self.vm.running() and '"setup_seconds"' not in (
            self.result.read_text() if self.result.exists() else ""
        )

    def go(self) -> None:
        """Full priority, then the guest's timed phases start."""
        self.vm.renice(0)
        self.nice = 0
        (self.rwdir / "go").touch()

    def stop(self) -> None:
        self._stopped.set()
        self.vm.stop()

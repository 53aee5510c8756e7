"""Run the whole suite on this host: `./weir up [--instance NAME ...]`.

Starts every service of the node as its own process (orchestrator first, since
it creates the shared maps), passes the common flags on, and stops them all
with SIGTERM when it gets SIGINT or SIGTERM itself. If a service dies, the
suite stops the rest and exits non-zero: a supervisor (systemd, compose)
decides about restarts, and the datapath keeps forwarding meanwhile.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType

from services.common.config import NodeConfig

SERVICES = ["orchestrator", "prefilter", "policy", "lb"]
START_GRACE = 0.5


def main(argv: list[str]) -> int:
    NodeConfig.from_args(argv, "suite")  # validate the flags once, before starting anything
    processes: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    for service in SERVICES:
        processes[service] = subprocess.Popen([sys.executable, "-m", f"services.{service}", *argv])
        time.sleep(START_GRACE)
    code = 0
    while not stopping:
        for service, process in processes.items():
            if process.poll() is not None:
                print(f"weir: {service} exited with {process.returncode}", file=sys.stderr)
                stopping, code = True, 1
        time.sleep(0.2)
    for process in processes.values():
        if process.poll() is None:
            process.terminate()
    for process in processes.values():
        process.wait(timeout=15)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

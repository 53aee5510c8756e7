"""Boot Debian's kernel in a VM (virtme-ng, qemu TCG) sharing this checkout, and run a command there.

The host kernel of the build machines has no ESP; Debian's `linux-image-amd64` has it
as modules, which the guest loads from the host's /lib/modules. The guest sees the
host's files read-only except the `rwdir` given, where the command leaves its results.
`unavailable()` says why a VM cannot be booted here (no kernel image, no qemu, no vng).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
GUEST_PREAMBLE = """#!/bin/bash
set -u
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
mkdir -p /sys/fs/cgroup/unified
modprobe -a esp4 esp6 xfrm_user xfrm4_tunnel gcm aes_generic cbc sha256_generic 2>/dev/null
ip link set lo up
# what runs, every 30 s: the only view into a slow guest while it works
(while sleep 30; do cut -d' ' -f1 /proc/uptime; ps -eo etimes,pcpu,args | cut -c1-160 | grep -v ' [[]'; done \
  > {rwdir}/ps.log 2>&1) &
cd {repo}
"""


def kernel_image() -> Path | None:
    """The newest Debian kernel image in /boot whose modules are installed, if any."""
    images = sorted(Path("/boot").glob("vmlinuz-*"), key=lambda p: p.stat().st_mtime)
    for image in reversed(images):
        version = image.name.removeprefix("vmlinuz-")
        if (Path("/lib/modules") / version / "modules.dep").exists():
            return image
    return None


def vng() -> str | None:
    return shutil.which("vng", path=f"{VENV_BIN}:/usr/local/bin:/usr/bin:/bin")


def unavailable() -> str:
    """Why no VM can be booted here; empty when one can."""
    if kernel_image() is None:
        return "no Debian kernel image with modules in /boot (apt-get install linux-image-amd64; ./weir setup does)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is missing (apt-get install qemu-system-x86; ./weir setup does)"
    if vng() is None:
        return "virtme-ng's vng is missing from the venv (pip install -r requirements.txt; ./weir setup does)"
    if shutil.which("busybox") is None:
        return "busybox (static) is missing: virtme-ng needs it (apt-get install busybox-static)"
    return ""


class Vm:
    """One booted VM running a script: in its own process group (vng and its qemu), niced if asked.

    The group stays in the caller's session: with autogroup scheduling, a new session
    would get its own share of the CPU whatever its nice value.
    """

    def __init__(self, body: str, rwdir: Path, memory: str = "2G", cpus: int = 2, nice: int = 0) -> None:
        image = kernel_image()
        tool = vng()
        if image is None or tool is None:
            raise RuntimeError(unavailable())
        rwdir.mkdir(parents=True, exist_ok=True)
        script = rwdir / "guest.sh"
        preamble = GUEST_PREAMBLE.format(repo=REPO, rwdir=rwdir)
        script.write_text(preamble + f"exec > {rwdir}/guest.log 2>&1\n" + body + "\n")
        script.chmod(0o755)
        argv = [
            "nice", "-n", str(nice),
            tool, "--run", str(image), "--disable-kvm", "--memory", memory, "--cpus", str(cpus),
            "--rwdir", str(rwdir), "--", str(script),
        ]  # fmt: skip
        env = {"PATH": f"{VENV_BIN}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "TERM": "dumb"}
        self.rwdir = rwdir
        self.process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=env, process_group=0,
        )  # fmt: skip
        self._output: tuple[str, str] | None = None

    def renice(self, nice: int) -> None:
        """Set the nice value of every thread of the group (vng, qemu and its vCPU threads)."""
        with contextlib.suppress(ProcessLookupError):
            os.setpriority(os.PRIO_PGRP, self.process.pid, nice)

    def running(self) -> bool:
        return self.process.poll() is None

    def wait(self, timeout: float) -> subprocess.CompletedProcess[str]:
        """Wait for the guest to power off; raises subprocess.TimeoutExpired (the VM still runs)."""
        if self._output is None:
            self._output = self.process.communicate(timeout=timeout)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, *self._output)

    def stop(self) -> None:
        """End the VM at once (the whole group); safe twice and after it ended."""
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(timeout=30)


def run_in_vm(
    body: str, rwdir: Path, timeout: float, memory: str = "2G", cpus: int = 2
) -> subprocess.CompletedProcess[str]:
    """Boot the VM, run the shell `body` (after the common preamble) as root, return vng's output.

    The guest's stdout and stderr go to `rwdir/guest.log`.
    """
    vm = Vm(body, rwdir, memory, cpus)
    try:
        return vm.wait(timeout)
    finally:
        vm.stop()

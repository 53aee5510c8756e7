"""bpffs: refuse non-bpf paths, create pin directories 0700, remove pins, mount when missing."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.bpffs import BPF_FS_MAGIC, ensure_bpffs, fs_magic, is_bpffs, remove_pins
from services.common.errors import FailedPrecondition

REPO = Path(__file__).resolve().parents[2]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount bpffs")

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_BPF = 321  # x86_64
_BPF_MAP_CREATE, _BPF_OBJ_PIN = 0, 6
_BPF_MAP_TYPE_ARRAY = 2


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    ret = int(_libc.syscall(_SYS_BPF, cmd, buf, 128))
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def pin_array_map(path: Path) -> None:
    """Create a tiny array map and pin it at ``path`` (raw bpf(2), no libbpf needed)."""
    fd = _bpf(_BPF_MAP_CREATE, bytes((ctypes.c_uint32 * 4)(_BPF_MAP_TYPE_ARRAY, 4, 4, 1)))
    try:
        name = ctypes.create_string_buffer(os.fsencode(path))
        attr = ctypes.c_uint64(ctypes.addressof(name)).value.to_bytes(8, "little")
        _bpf(_BPF_OBJ_PIN, attr + fd.to_bytes(4, "little") + bytes(4))
    finally:
        os.close(fd)


@pytest.fixture
def bpf_mount(tmp_path: Path) -> Iterator[Path]:
    """A private bpffs instance on a temporary directory (each bpffs mount is a fresh fs)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount bpffs")
    target = tmp_path / "bpffs"
    target.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(target)], check=True)
    yield target
    subprocess.run(["umount", "-l", str(target)], check=True)


def test_tmp_is_not_bpffs(tmp_path: Path) -> None:
    assert fs_magic(tmp_path) != BPF_FS_MAGIC
    assert not is_bpffs(tmp_path / "not" / "yet")


def test_ensure_refuses_a_path_off_bpffs(tmp_path: Path) -> None:
    with pytest.raises(FailedPrecondition, match="not on a bpf filesystem"):
        ensure_bpffs(tmp_path / "weir" / "globals")
    assert not (tmp_path / "weir").exists()


def test_remove_pins_refuses_a_path_off_bpffs(tmp_path: Path) -> None:
    (tmp_path / "keep").write_text("precious")
    with pytest.raises(FailedPrecondition, match="refusing"):
        remove_pins(tmp_path)
    assert (tmp_path / "keep").exists()
    remove_pins(tmp_path / "missing")  # nothing there: nothing to do


def test_ensure_creates_private_dirs(bpf_mount: Path) -> None:
    target = bpf_mount / "n1" / "globals"
    ensure_bpffs(target)
    ensure_bpffs(target)  # idempotent
    assert target.is_dir()
    for directory in (target, target.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert is_bpffs(target)


def test_remove_pins_unpins_a_tree(bpf_mount: Path) -> None:
    root = bpf_mount / "n1"
    ensure_bpffs(root / "lb" / "sub")
    pin_array_map(root / "lb" / "map_a")
    pin_array_map(root / "lb" / "sub" / "map_b")
    ensure_bpffs(root / "globals")
    pin_array_map(root / "globals" / "shared")
    remove_pins(root / "lb")
    assert not (root / "lb").exists()
    assert (root / "globals" / "shared").exists()
    remove_pins(root / "globals" / "shared")  # a single pin
    assert not (root / "globals" / "shared").exists()


@needs_root
def test_mounts_sys_fs_bpf_when_missing() -> None:
    """In a private mount namespace, unmount /sys/fs/bpf and let ensure_bpffs mount it again.

    The host's mounts are untouched: the namespace has its own (empty) bpffs instance.
    """
    script = textwrap.dedent(
        """
        import subprocess, sys
        from pathlib import Path
        from services.common.bpffs import BPFFS_MOUNT, ensure_bpffs, is_bpffs
        while is_bpffs(BPFFS_MOUNT):
            subprocess.run(["umount", str(BPFFS_MOUNT)], check=True)
        target = Path("/sys/fs/bpf/weir-common-test/globals")
        ensure_bpffs(target)
        assert is_bpffs(BPFFS_MOUNT) and target.is_dir(), "not mounted"
        print("mounted")
        """
    )
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "true"], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"cannot make a mount namespace: {probe.stderr.decode().strip()}")
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "mounted"
    assert not Path("/sys/fs/bpf/weir-common-test").exists()

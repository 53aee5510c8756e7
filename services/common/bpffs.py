"""Pin directories on bpffs: make sure they exist on a real bpf filesystem, and clean them up.

Pins outlive processes only on bpffs; a pin directory that silently landed on tmpfs or ext4
would make every pin fail later with a confusing error, so this checks up front.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
from pathlib import Path

from services.common.errors import FailedPrecondition

BPF_FS_MAGIC = 0xCAFE4A11
BPFFS_MOUNT = Path("/sys/fs/bpf")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Statfs(ctypes.Structure):
    """``struct statfs`` (64-bit Linux); only ``f_type`` is read, the rest is room to write."""

    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 256)]


def fs_magic(path: Path) -> int:
    """The filesystem magic (``statfs.f_type``) of the filesystem holding ``path``."""
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(path))
    return int(buf.f_type) & 0xFFFFFFFF


def _existing_ancestor(path: Path) -> Path:
    """The path itself or its nearest existing parent (what ``statfs`` can look at)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def is_bpffs(path: Path) -> bool:
    """True if ``path`` (or, when missing, its nearest existing parent) is on bpffs."""
    return fs_magic(_existing_ancestor(path)) == BPF_FS_MAGIC


def _mount_bpffs(target: Path) -> None:
    """mount -t bpf bpf <target>."""
    if _libc.mount(b"bpf", os.fsencode(target), b"bpf", ctypes.c_ulong(0), None) != 0:
        err = ctypes.get_errno()
        raise FailedPrecondition(
            f"cannot mount bpffs at {target}: {os.strerror(err)}; "
            f"run 'mount -t bpf bpf {target}' as root or pass a --bpffs-root on a bpf filesystem"
        )


def ensure_bpffs(path: Path) -> None:
    """Make ``path`` an existing directory on bpffs, mounting /sys/fs/bpf first if needed.

    Directories created here are mode 0700: pins give access to live datapath maps.
    """
    path = path.absolute()
    if not is_bpffs(path):
        on_default_mount = path == BPFFS_MOUNT or BPFFS_MOUNT in path.parents
        if on_default_mount and BPFFS_MOUNT.is_dir() and not is_bpffs(BPFFS_MOUNT):
            _mount_bpffs(BPFFS_MOUNT)
        if not is_bpffs(path):
            raise FailedPrecondition(
                f"{path} is not on a bpf filesystem; mount one ('mount -t bpf bpf <dir>') "
                "or choose a --bpffs-root under /sys/fs/bpf"
            )
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:
            continue  # another service created it concurrently
        os.chmod(directory, 0o700)
    if not path.is_dir():
        raise FailedPrecondition(f"{path} exists on bpffs but is not a directory")


def remove_pins(path: Path) -> None:
    """Remove a pin directory tree (unpinning its maps, programs and links); missing is fine.

    Refuses to touch anything that is not on bpffs, so a misconfigured root cannot turn this
    into an rm -rf of ordinary files.
    """
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not is_bpffs(path):
        raise FailedPrecondition(f"refusing to remove {path}: it is not on a bpf filesystem")
    if not stat.S_ISDIR(mode):
        path.unlink(missing_ok=True)
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            Path(root, name).unlink(missing_ok=True)
        for name in dirs:
            entry = Path(root, name)
            if entry.is_symlink():
                entry.unlink()
            else:
                entry.rmdir()
    path.rmdir()

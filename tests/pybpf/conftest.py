"""Fixtures for the pybpf tests: built BPF objects, a private pin directory,
network namespaces with a veth pair, and a scratch cgroup.

Everything a test creates is removed at teardown, even when the test fails;
nothing outside the namespaces, the pin directory and the cgroup is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import pybpf

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "bpf" / "testdata"
BUILD = REPO / "bpf" / "build"
BPFFS = Path("/sys/fs/bpf")
CGROUP2 = Path("/sys/fs/cgroup/unified")
FIXTURES = ("pybpf_maps", "pybpf_reuse", "pybpf_incompat", "pybpf_reject", "pybpf_sock", "pybpf_inner")

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@pytest.fixture(scope="session", autouse=True)
def _root_and_bpffs() -> Iterator[None]:
    """Skip without root; mount the bpffs; fail if a test pinned outside its pin_dir."""
    if os.geteuid() != 0:
        pytest.skip("pybpf tests need root (CAP_BPF, CAP_NET_ADMIN)")
    if not os.path.ismount(BPFFS):
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    before = set(os.listdir(BPFFS))
    yield
    leaked = {name for name in set(os.listdir(BPFFS)) - before if name == "shared_counter"}
    assert not leaked, f"a test pinned {leaked} in {BPFFS} instead of its pin_dir"


def _compile(src: Path, dst: Path) -> None:
    clang = shutil.which("clang")
    if clang is None:
        pytest.skip("clang is needed to build the BPF test fixtures")
    arch_include = f"/usr/include/{platform.machine()}-linux-gnu"
    flags = ["-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-I{arch_include}"]
    subprocess.run([clang, *flags, "-c", str(src), "-o", str(dst)], check=True)


@pytest.fixture(scope="session")
def objects(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths of the fixture objects: bpf/build/<name>.o when fresh, else built here."""
    paths: dict[str, Path] = {}
    out_dir = tmp_path_factory.mktemp("bpf")
    for name in FIXTURES:
        src, built = TESTDATA / f"{name}.bpf.c", BUILD / f"{name}.o"
        if built.exists() and built.stat().st_mtime >= src.stat().st_mtime:
            paths[name] = built
        else:
            paths[name] = out_dir / f"{name}.o"
            _compile(src, paths[name])
    return paths


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    """A fresh directory on the bpffs, removed with everything pinned in it."""
    path = Path(tempfile.mkdtemp(prefix="pybpf-test-", dir=BPFFS))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def maps_obj(objects: dict[str, Path], pin_dir: Path) -> Iterator[pybpf.BpfObject]:
    """pybpf_maps loaded with its shared map pinned under the test's pin_dir."""
    with pybpf.BpfObject.load_file(objects["pybpf_maps"], pin_root=pin_dir) as obj:
        yield obj


@pytest.fixture
def sock_obj(objects: dict[str, Path]) -> Iterator[pybpf.BpfObject]:
    with pybpf.BpfObject.load_file(objects["pybpf_sock"]) as obj:
        yield obj


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


@contextlib.contextmanager
def in_netns(name: str) -> Iterator[None]:
    """Move this thread into network namespace ``name`` for the block (netlink, sockets)."""
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if _libc.setns(target, _CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {name}")
        try:
            yield
        finally:
            if _libc.setns(original, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original namespace")
    finally:
        os.close(target)
        os.close(original)


@dataclass(frozen=True)
class VethPair:
    """veth0 (10.99.0.1, namespace ``peer_ns``) <-> veth1 (10.99.0.2, namespace ``ns``).

    While the fixture is active the test thread is inside ``ns``.
    """

    ns: str
    peer_ns: str
    addr: str = "10.99.0.2"
    peer_addr: str = "10.99.0.1"


@pytest.fixture
def veth() -> Iterator[VethPair]:
    tag = uuid.uuid4().hex[:8]
    pair = VethPair(ns=f"pybpf-{tag}", peer_ns=f"pybpf-{tag}-peer")
    try:
        run("ip", "netns", "add", pair.ns)
        run("ip", "netns", "add", pair.peer_ns)
        run("ip", "-n", pair.peer_ns, "link", "add", "veth0", "type", "veth", "peer", "name", "veth1", "netns", pair.ns)
        run("ip", "-n", pair.peer_ns, "addr", "add", f"{pair.peer_addr}/24", "dev", "veth0")
        run("ip", "-n", pair.ns, "addr", "add", f"{pair.addr}/24", "dev", "veth1")
        run("ip", "-n", pair.peer_ns, "link", "set", "veth0", "up")
        run("ip", "-n", pair.ns, "link", "set", "veth1", "up")
        with in_netns(pair.ns):
            yield pair
    finally:
        for ns in (pair.ns, pair.peer_ns):
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.fixture
def cgroup() -> Iterator[Path]:
    """An empty cgroup v2 directory, removed at the end."""
    if not os.path.ismount(CGROUP2):
        pytest.skip(f"no cgroup2 mount at {CGROUP2}")
    path = CGROUP2 / f"pybpf-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        yield path
    finally:
        path.rmdir()


@pytest.fixture
def inner_obj(objects: dict[str, Path]) -> Iterator[pybpf.BpfObject]:
    with pybpf.BpfObject.load_file(objects["pybpf_inner"]) as obj:
        yield obj

"""A real etcd for tests: Debian's `etcd` binary on loopback ports, data in a temp dir.

`EtcdServer.start()` picks free ports, runs etcd as a child process and waits until it
answers. With `netns` set it runs inside that network namespace, listening on every
address there, for nodes that reach it over veths the test made. `stop()` kills it (the
data dir stays, so `start()` again brings the same data back, as after an etcd outage);
`close()` stops it and removes the data dir.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.orchestrator.kvstore import KvStore, KvStoreConfig, KvStoreUnavailable
from tests.harness.netns import nsenter_argv

ETCD = shutil.which("etcd")
MISSING = "the etcd binary is not installed (Debian's etcd-server; ./weir setup installs it)"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclass
class EtcdServer:
    host: str = "127.0.0.1"
    client_port: int = field(default_factory=free_port)
    peer_port: int = field(default_factory=free_port)
    data: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="weir-etcd-")))
    netns: str | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.client_port}"

    @property
    def log(self) -> Path:
        return self.data / "etcd.log"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        assert ETCD is not None, MISSING
        peer = f"http://{self.host}:{self.peer_port}"
        listen = f"http://0.0.0.0:{self.client_port}" if self.netns else self.url
        argv = [
            *(nsenter_argv(self.netns) if self.netns else []),
            ETCD,
            "--name=weir-test",
            f"--data-dir={self.data / 'data'}",
            f"--listen-client-urls={listen}",
            f"--advertise-client-urls={self.url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=weir-test={peer}",
            "--log-level=warn",
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if self.netns:
            self._wait_in_netns(timeout)
            return self
        kv = KvStore(KvStoreConfig((self.url,), timeout=1.0))
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    kv.version()
                    return self
                except KvStoreUnavailable:
                    if self.process.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"etcd did not start: {self.log.read_text()[-2000:]}") from None
                    time.sleep(0.1)
        finally:
            kv.close()

    def _wait_in_netns(self, timeout: float) -> None:
        """Our client's sockets would open in this namespace, so etcdctl asks from inside."""
        assert self.process is not None and self.netns is not None
        deadline = time.monotonic() + timeout
        health = [*nsenter_argv(self.netns), "etcdctl", f"--endpoints={self.url}", "endpoint", "health"]
        while subprocess.run(health, capture_output=True, timeout=10, env={"ETCDCTL_API": "3"}).returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {self.log.read_text()[-2000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)

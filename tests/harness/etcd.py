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


@dataclass(frozen=True)
class TlsFiles:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    @classmethod
    def make(cls, directory: Path) -> TlsFiles:
        def run(*argv: str) -> None:
            subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=directory, timeout=60)

        ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
        run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=weir-test-ca")
        for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
            (directory / f"{name}.ext").write_text(ext + "\n")
            run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=weir-test-{name}")
            run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
        d = directory
        return cls(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")

    def server_flags(self) -> list[str]:
        return [
            f"--cert-file={self.server_cert}",
            f"--key-file={self.server_key}",
            f"--trusted-ca-file={self.ca}",
            "--client-cert-auth",
        ]


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
    tls: TlsFiles | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.client_port}"

    def client_config(self) -> KvStoreConfig:
        """How a client reaches this etcd (with the client certificate when it serves TLS)."""
        if self.tls is None:
            return KvStoreConfig((self.url,), timeout=1.0)
        return KvStoreConfig((self.url,), self.tls.ca, self.tls.client_cert, self.tls.client_key, timeout=1.0)

    @property
    def log(self) -> Path:
        return self.data / "etcd.log"

    def start(self, timeout: float = 20.0) -> EtcdServer:
        assert ETCD is not None, MISSING
        peer = f"http://{self.host}:{self.peer_port}"
        listen = f"http://0.0.0.0:{self.client_port}" if self.netns else self.url
        tls = self.tls.server_flags() if self.tls else []
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
            *tls,
        ]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        if self.netns:
            self._wait_in_netns(timeout)
            return self
        kv = KvStore(self.client_config())
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

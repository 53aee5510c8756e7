"""NodeConfig: derived defaults, flags over env, and the TCP-needs-TLS rule."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from services.common.config import ENV, TLS_REQUIRED, NodeConfig, cgroup2_mount


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The machine's own WEIR_* variables must not leak into these tests."""
    for var in ENV.values():
        monkeypatch.delenv(var, raising=False)


def test_defaults_follow_the_instance_name() -> None:
    config, _ = NodeConfig.from_args(["--instance", "node1"], "lb")
    assert config.instance == "node1"
    assert config.bpffs_root == Path("/sys/fs/bpf/node1")
    assert config.run_dir == Path("/run/node1")
    assert config.state_dir == Path("/var/lib/node1")
    assert config.cgroup_root == cgroup2_mount() / "node1"
    assert config.tcp_listen is None
    assert config.log_level == "info"
    assert config.socket_path("lb") == Path("/run/node1/lb.sock")
    assert config.service_pin_dir("lb") == Path("/sys/fs/bpf/node1/lb")
    assert config.globals_pin_dir == Path("/sys/fs/bpf/node1/globals")
    assert config.state_db("lb") == Path("/var/lib/node1/lb.db")


def test_plain_constructor_has_the_same_defaults() -> None:
    assert NodeConfig() == NodeConfig.from_args([], "lb")[0]
    assert NodeConfig().bpffs_root == Path("/sys/fs/bpf/weir")


def test_env_supplies_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEIR_INSTANCE", "n2")
    monkeypatch.setenv("WEIR_RUN_DIR", str(tmp_path / "run"))
    monkeypatch.setenv("WEIR_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("WEIR_BPFFS_ROOT", "/sys/fs/bpf/custom")
    monkeypatch.setenv("WEIR_CGROUP_ROOT", str(tmp_path / "cg"))
    monkeypatch.setenv("WEIR_LOG_LEVEL", "DEBUG")
    config, _ = NodeConfig.from_args([], "policy")
    assert config.instance == "n2"
    assert config.run_dir == tmp_path / "run"
    assert config.state_dir == tmp_path / "state"
    assert config.bpffs_root == Path("/sys/fs/bpf/custom")
    assert config.cgroup_root == tmp_path / "cg"
    assert config.log_level == "debug"
    assert config.socket_path("policy") == tmp_path / "run" / "policy.sock"


def test_flags_override_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WEIR_INSTANCE", "from-env")
    monkeypatch.setenv("WEIR_RUN_DIR", "/env/run")
    config, _ = NodeConfig.from_args(
        ["--instance", "from-flag", "--run-dir", str(tmp_path), "--log-level", "warning"], "lb"
    )
    assert config.instance == "from-flag"
    assert config.run_dir == tmp_path
    assert config.state_dir == Path("/var/lib/from-flag")
    assert config.log_level == "warning"


def test_service_flags_via_extra() -> None:
    def extra(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="eth0")

    config, args = NodeConfig.from_args(["--device", "veth1", "--instance", "a"], "prefilter", extra)
    assert args.device == "veth1"
    assert config.instance == "a"


def test_tcp_without_tls_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        NodeConfig.from_args(["--tcp-listen", "127.0.0.1:50051"], "lb")
    assert exit_info.value.code == 2
    assert TLS_REQUIRED in capsys.readouterr().err


def test_tcp_from_env_without_tls_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WEIR_TCP_LISTEN", "127.0.0.1:50051")
    monkeypatch.setenv("WEIR_TLS_CERT", "/etc/weir/cert.pem")
    with pytest.raises(SystemExit):
        NodeConfig.from_args([], "lb")
    assert TLS_REQUIRED in capsys.readouterr().err


def test_constructor_refuses_tcp_without_tls() -> None:
    with pytest.raises(ValueError, match=TLS_REQUIRED):
        NodeConfig(tcp_listen="127.0.0.1:1")


def test_tcp_with_tls_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIR_TLS_KEY", "/k.pem")
    config, _ = NodeConfig.from_args(
        ["--tcp-listen", "[::1]:9000", "--tls-cert", "/c.pem", "--tls-client-ca", "/ca.pem"], "lb"
    )
    assert config.tcp_listen == "[::1]:9000"
    assert config.tls_cert == Path("/c.pem")
    assert config.tls_key == Path("/k.pem")
    assert config.tls_client_ca == Path("/ca.pem")


@pytest.mark.parametrize(
    "argv",
    [
        ["--tcp-listen", "nope", "--tls-cert", "/c", "--tls-key", "/k"],
        ["--tcp-listen", "::1:80", "--tls-cert", "/c", "--tls-key", "/k"],
        ["--tcp-listen", "host:99999", "--tls-cert", "/c", "--tls-key", "/k"],
        ["--tls-cert", "/c"],
        ["--instance", "a/b"],
        ["--log-level", "chatty"],
    ],
)
def test_bad_input_exits_with_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        NodeConfig.from_args(argv, "lb")
    assert exit_info.value.code == 2


def test_config_is_frozen_and_replaceable() -> None:
    config = NodeConfig(instance="x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.instance = "y"  # type: ignore[misc]
    moved = dataclasses.replace(config, run_dir=Path("/tmp/x"))
    assert moved.run_dir == Path("/tmp/x")
    assert moved.bpffs_root == Path("/sys/fs/bpf/x")


def test_each_instance_gets_its_own_cgroup_subtree() -> None:
    """Two instances on defaults must not share the attach point of their socket hooks."""
    one, two = NodeConfig(instance="a"), NodeConfig(instance="b")
    assert one.cgroup_root != two.cgroup_root
    assert one.cgroup_root.parent == two.cgroup_root.parent == cgroup2_mount()
    assert one.cgroup_root.name == "a"


def test_cgroup2_mount_is_read_from_the_mount_table(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text(
        "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n"
        "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n"
        "cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n"
    )
    unified = tmp_path / "unified"
    unified.write_text("cgroup2 /sys/fs/cgroup cgroup2 rw,nsdelegate 0 0\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.write_text("cgroup2 /mnt/cg2 cgroup2 rw 0 0\n")
    assert cgroup2_mount(hybrid) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(unified) == Path("/sys/fs/cgroup")
    assert cgroup2_mount(elsewhere) == Path("/mnt/cg2")

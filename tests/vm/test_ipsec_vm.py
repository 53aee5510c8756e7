"""The VM tier for IPsec: real ESP on Debian's kernel, in a VM (virtme-ng, qemu TCG).

The host kernel has no ESP, so a VM sharing this checkout runs `tests.vm.ipsec_guest`
(booted niced when the session starts, let go when these tests start: tests/vm/conftest.py):
two nodes (namespaces, each its own orchestrator and ipsec service) joined by an underlay,
an endpoint on each. The guest writes what it measured to a shared directory; the
assertions are here. One boot for every check (the services take 30-45 s to start under
TCG). Skipped only when no VM can be booted on this machine (no kernel image, qemu or
virtme-ng), with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from typing import Any

import pytest

from tests.vm.ipsec_boot import IpsecVm

pytestmark = pytest.mark.root
# How long these tests wait for the guest once they let it go (what is left of its boot and
# set-up, then its timed phases): about 4 minutes on 2 idle cores; a loaded machine may give more.
VM_TIMEOUT = float(os.environ.get("WEIR_VM_TIMEOUT", "960"))


@pytest.fixture(scope="module")
def guest(ipsec_vm: IpsecVm) -> dict[str, Any]:
    """What the guest wrote, whether or not its IPsec scenario finished."""
    vm = ipsec_vm  # booted at the session's start (tests/vm/conftest.py)
    started = time.monotonic()
    try:
        run = vm.vm.wait(timeout=VM_TIMEOUT)
    except subprocess.TimeoutExpired:
        vm.stop()
        run = vm.vm.wait(timeout=30)
    out = vm.result
    log = (vm.rwdir / "guest.log").read_text(errors="replace")[-6000:] if (vm.rwdir / "guest.log").exists() else ""
    where = f"(the guest's files: {vm.rwdir})"
    assert out.exists(), f"the guest wrote no result {where} (vng exit {run.returncode}):\n{run.stderr[-3000:]}\n{log}"
    data: dict[str, Any] = json.loads(out.read_text())
    data["wall_seconds"] = time.monotonic() - started
    data["since_boot_seconds"] = time.monotonic() - vm.booted
    print(json.dumps(data, indent=1, sort_keys=True))
    print(
        f"the VM tier took {data['wall_seconds']:.0f} s in its tests, {data['since_boot_seconds']:.0f} s since its boot"
        f" (setup {data.get('setup_seconds')} s, held {data.get('held_seconds')} s)"
    )
    data["log"] = f"{where}\n{log}"
    return data


@pytest.fixture(scope="module")
def result(guest: dict[str, Any]) -> dict[str, Any]:
    assert guest.get("done"), f"the guest did not finish:\n{guest['log']}"
    assert "setup_error" not in guest, f"{guest['setup_error']}\n{guest['log']}"
    return guest


def _phase(result: dict[str, Any], name: str) -> dict[str, Any]:
    phase: dict[str, Any] = result.get(name) or {}
    assert phase, f"phase {name} did not run: {result}"
    assert "error" not in phase, f"{phase['error']}\n{result['log']}"
    return phase


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_traffic_between_nodes_is_esp_and_arrives(result: dict[str, Any]) -> None:
    p = _phase(result, "encrypted")
    assert p["delivered"] == 20 and p["delivered6"] == 20, p
    assert p["underlay_protocols"] == [50], f"only ESP on the underlay: {p}"
    assert p["underlay_esp"] >= 40 and p["spis"] == [1]
    assert not p["underlay_marker"] and p["underlay_plaintext"] == 0
    # the IPv6 endpoints' packets cross inside ESP between the IPv4 underlay addresses: none in IPv6 on the wire
    assert p["underlay_plaintext6"] == 0 and p["underlay_ipv6_packets"] == 0, p
    assert p["outside_marker"], "traffic to outside the cluster is not encrypted"
    assert p["encrypted_a"] >= 40 and p["decrypted_b"] >= 40, p


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_rotation_under_a_counted_stream_loses_nothing(result: dict[str, Any]) -> None:
    p = _phase(result, "rotation")
    assert p["sent"] > 0 and p["lost"] == 0, p
    assert p["spis_in_order"] == [1, 2], f"the capture shows the SPI change: {p}"
    assert p["old_after_new"] == 0, p
    assert p["plaintext"] == 0
    assert p["rotations"] >= 1
    assert p["keys_after_grace"] == [2], f"the old key goes after its grace period: {p}"


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_a_wrong_key_is_counted_with_the_xfrm_error(result: dict[str, Any]) -> None:
    p = _phase(result, "wrong_key")
    assert p["delivered"] == 0 and p["esp_sent"] >= 10, p
    assert p["xfrm_errors"].get("XfrmInStateProtoError", 0) >= 10, p
    assert p["integrity_failed"] >= 10, p
    assert p["plaintext"] == 0
    assert p["delivered_after_repair"] == 5, p


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_removing_and_readding_the_peer_never_sends_plaintext(result: dict[str, Any]) -> None:
    p = _phase(result, "remove_readd")
    assert p["plaintext"] == 0 and p["esp"] > 0, p
    assert p["resumed"], p
    # the re-added OUT state goes on from the old state's sequence number: b's IN state (never
    # removed) takes the next packet at once instead of dropping them as replays
    assert p["xfrm_b"].get("XfrmInStateSeqError", 0) == 0, p
    assert p["lost_after_readd"] == [], f"every datagram sent after the re-add arrives: {p}"
    assert 0 < p["lost"] <= p["sent_while_absent"], f"only what was sent while the peer was absent is lost: {p}"


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_sigkill_of_the_service_under_traffic_never_sends_plaintext(result: dict[str, Any]) -> None:
    p = _phase(result, "sigkill")
    assert p["plaintext"] == 0, p
    # the datapath keeps encrypting while the service is down and after its restart (its OUT
    # states, with their sequence numbers, stay in the kernel): not one datagram is lost
    assert p["sent_while_down"] > 0 and p["lost"] == 0, f"every datagram arrives: {p}"
    assert p["resumed"] and p["egress_spi_after_restart"] == 4, p


@pytest.mark.timeout(VM_TIMEOUT + 60)
def test_every_bpf_program_loads_on_the_vm_kernel(guest: dict[str, Any]) -> None:
    """Debian 12's 6.1 verifier explores more states than the host's: a program may pass here only."""
    programs = _phase(guest, "load_all")["programs"]
    assert programs, "no object in bpf/build was found in the guest"
    refused = {name: r for name, r in programs.items() if not r["ok"]}
    report = "\n".join(f"{name}: {r['error']}\n  " + "\n  ".join(r["log_tail"]) for name, r in refused.items())
    assert not refused, f"refused by the VM kernel's verifier:\n{report}"


def test_overlay_peers_from_the_node_tables_send_only_esp_and_keep_the_vni_identity(result: dict[str, Any]) -> None:
    p = _phase(result, "overlay")
    # UpsertNode on each orchestrator made the other an overlay peer of its ipsec service (WatchNodes)
    assert len(p["peers"]) == 2, p
    # a stream ran while the nodes were added: from UpsertNode (the route into the overlay) to the
    # peer's installation, strict mode dropped its packets (ENCRYPTION_PENDING), none left as plain VXLAN
    w = p["new_node"]
    assert w["underlay_not_esp"] == 0 and w["underlay_protocols"] == [50], f"only ESP while the node came: {w}"
    assert w["pending_drops"] >= 1, f"the window was there, and closed by dropping: {w}"
    assert w["resumed"] and w["underlay_esp"] > 0, w
    # a full-size TCP stream: the overlay MTU leaves room for VXLAN and ESP (GCM over IPv4: 1500 - 54 - 50),
    # so no ESP packet is fragmented on the underlay, and the bytes arrive intact
    t = p["tcp"]
    assert t["overlay_mtu"] == 1396, t
    assert t["intact"] and t["fragments"] == 0 and t["underlay_not_esp"] == 0, t
    assert 1400 < t["largest_esp"] <= 1500, f"full-size segments, each within the underlay MTU: {t}"
    assert all(x["source"] == "nodes" and x["vxlan"] and x["egress_spi"] == 1 for x in p["peers"]), p
    # a direct route that wins over the overlay's (an operator's, or a stale one) sends nothing in clear:
    # the endpoint packets' pass is bound to the VXLAN device, so they meet the default drop
    m = p["misrouted"]
    assert m["delivered"] == 0 and not m["underlay_marker"] and m["underlay_plaintext"] == 0, m
    assert m["blocked"] >= 5, m
    assert p["delivered_client"] == 20 and p["delivered_other"] == 10, p
    # the VXLAN packets are encrypted: only ESP between the underlay addresses, no payload byte in clear
    assert p["underlay_protocols"] == [50], f"only ESP on the underlay (no UDP 8472): {p}"
    assert not p["underlay_marker"] and p["underlay_plaintext"] == 0, p
    assert p["spis"] == [1] and p["underlay_esp"] >= 30, p
    assert p["encrypted_a"] >= 30 and p["decrypted_b"] >= 30, p
    # decrypted on b, each VXLAN packet still carries its sender's identity in the VNI
    ids = p["identities"]
    vnis = {int(k): v for k, v in p["received_vnis"].items()}
    assert set(vnis) == {ids["client"], ids["other"]} and ids["client"] != ids["other"], p
    assert vnis[ids["client"]] >= 20 and vnis[ids["other"]] >= 10, p
    # the node's own packets into the overlay carry no encrypt mark: blocked, never plaintext VXLAN
    assert p["delivered_node"] == 0 and p["blocked_a"] >= 5, p

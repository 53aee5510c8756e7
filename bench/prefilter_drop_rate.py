"""Real traffic: how fast the XDP prefilter drops a denied source, next to iptables + ipset.

Two namespaces made here (wb<pid>-tx, wb<pid>-rx) are joined by a veth pair.
trafgen floods 64-byte UDP from 203.0.113.7 out of the sender's veth with one
sender process; the same frames go through, in one run:

  - no filter: what reaches UDP in the receiver (no socket listens, so the
    namespace's Udp NoPorts counter counts every datagram the stack delivered);
  - the prefilter attached to the receiver's veth (native XDP, else generic; a
    generic row is added when native works), with a deny list of N entries
    (mostly /32 hosts plus 1% prefixes) that holds the source: the prefilter's
    per-interface dropped counter;
  - an iptables raw PREROUTING DROP matching `-m set --match-set S src`, where
    S is a hash:net ipset holding the same N entries: the rule's packet counter.

Each setup runs for the same fixed window after a short warm-up, in turn, for
a few rounds; the medians per second are printed. On a veth the receiving side
runs in the sender's softirq on the sender's CPU, so a cheaper filter leaves
more of that CPU to the sender. Namespaces (with their ipsets and rules), pins
and temp files are removed afterwards.

    sudo .venv/bin/python -m bench.prefilter_drop_rate [--entries N] [--seconds S]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.netbench import (
    BPF_BUILD,
    VethPair,
    bpffs,
    exit_on_sigterm,
    filler_list,
    link_stats,
    rates,
    run,
    temp_dir,
    trafgen,
    trafgen_config,
    udp_frame,
    udp_snmp,
    veth_pair,
)
from pybpf import XdpMode
from services.common import netns
from services.common.errors import FailedPrecondition
from services.common.logs import setup_logging
from services.common.store import Store
from services.orchestrator.chain import Chain
from services.orchestrator.devices import Devices
from services.prefilter.denylist import Capacity
from services.prefilter.maps import PrefilterMaps
from services.prefilter.prefilter import Prefilter

SOURCE = "203.0.113.7"
IPSET = "weir_bench_deny"


@dataclass(frozen=True)
class Setup:
    """One way of dropping the flood: how to switch it on and off, and its drop counter."""

    name: str
    enable: Callable[[], None]
    disable: Callable[[], None]
    dropped: Callable[[], int]


@dataclass(frozen=True)
class Row:
    setup: str
    sent: float
    dropped: float
    reached_udp: float


def flood(pair: VethPair, config: Path, setup: Setup, warmup: float, seconds: float) -> Row:
    """Send for warm-up + window with `setup` on; per-second sent / dropped / reached-UDP rates."""
    counters = {
        "sent": lambda: link_stats(pair.tx_ns, pair.tx_dev)["tx_packets"],
        "dropped": setup.dropped,
        "reached_udp": lambda: udp_snmp(pair.rx_ns)["NoPorts"],
    }
    setup.enable()
    try:
        with trafgen(pair.tx_ns, pair.tx_dev, config):
            time.sleep(warmup)
            r = rates(counters, seconds)
    finally:
        setup.disable()
    return Row(setup.name, r["sent"], r["dropped"], r["reached_udp"])


def xdp_setups(prefilter: Prefilter, pair: VethPair) -> tuple[list[Setup], str]:
    """Native XDP (and generic beside it) if the veth takes native, else generic alone; and why."""
    note = ""
    with netns.entered(pair.rx_ns):
        try:
            info = prefilter.attach(pair.rx_dev, XdpMode.NATIVE)
        except FailedPrecondition as exc:
            note = f"native XDP refused: {exc}; using generic"
            info = prefilter.attach(pair.rx_dev, XdpMode.GENERIC)
        prefilter.detach(pair.rx_dev)
    modes = [XdpMode.NATIVE, XdpMode.GENERIC] if info.mode is XdpMode.NATIVE else [XdpMode.GENERIC]

    def dropped() -> int:
        return sum(int(c.stats.dropped.packets) for c in prefilter.interface_counters() if c.ifindex == info.ifindex)

    def enable(mode: XdpMode) -> None:
        with netns.entered(pair.rx_ns):
            prefilter.attach(pair.rx_dev, mode)

    def disable() -> None:
        with netns.entered(pair.rx_ns):
            prefilter.detach(pair.rx_dev)

    setups = [Setup(f"XDP prefilter ({m.name.lower()})", functools.partial(enable, m), disable, dropped) for m in modes]
    return setups, note


def iptables_setup(pair: VethPair, entries: list[str], tmp: Path) -> Setup:
    """iptables raw DROP on a hash:net ipset of the same entries, inside the receiver's namespace."""
    restore = tmp / "deny.ipset"
    restore.write_text(
        f"create {IPSET} hash:net family inet maxelem {max(65536, 2 * len(entries))}\n"
        + "".join(f"add {IPSET} {cidr}\n" for cidr in entries)
    )
    run("ipset", "restore", "-file", str(restore), ns=pair.rx_ns)

    def rule(action: str) -> None:
        run(
            "iptables",
            "-t",
            "raw",
            action,
            "PREROUTING",
            "-m",
            "set",
            "--match-set",
            IPSET,
            "src",
            "-j",
            "DROP",
            ns=pair.rx_ns,
        )

    def packets() -> int:
        listing = run("iptables", "-t", "raw", "-L", "PREROUTING", "-v", "-x", "-n", ns=pair.rx_ns).stdout
        return sum(int(line.split()[0]) for line in listing.splitlines() if f"match-set {IPSET} src" in line)

    return Setup("iptables raw + ipset", functools.partial(rule, "-A"), functools.partial(rule, "-D"), packets)


def measure(entries: list[str], rounds: int, warmup: float, seconds: float) -> tuple[list[Row], str]:
    """Median rates per setup over `rounds` rounds, each round running every setup once, in turn."""
    with veth_pair() as pair, temp_dir() as tmp, bpffs() as root:
        config = tmp / "udp64.trafgen"
        config.write_text(trafgen_config(udp_frame(SOURCE, pair.rx_addr, pair.tx_mac, pair.rx_mac)))
        # The orchestrator's chain in this process: it places the program and runs XDP on the device.
        orch_store = Store(tmp / "orchestrator.db")
        chain = Chain(BPF_BUILD, root / "globals", root / "orchestrator", orch_store)
        chain.start()
        maps = PrefilterMaps(
            BPF_BUILD,
            root / "globals",
            root / "prefilter",
            Capacity(hosts=len(entries), prefixes=max(1, len(entries) // 50)),
            register=chain.registrar("prefilter"),
        )
        store = Store(tmp / "prefilter.db")
        prefilter = Prefilter(maps, store, Devices(chain, orch_store))
        try:
            prefilter.start()
            prefilter.replace((cidr, False) for cidr in entries)
            xdp, note = xdp_setups(prefilter, pair)
            setups = [
                Setup("no filter", lambda: None, lambda: None, lambda: 0),
                *xdp,
                iptables_setup(pair, entries, tmp),
            ]
            runs: dict[str, list[Row]] = {s.name: [] for s in setups}
            for _ in range(rounds):
                for setup in setups:
                    runs[setup.name].append(flood(pair, config, setup, warmup, seconds))
        finally:
            prefilter.close()
            store.close()
            chain.close()
            orch_store.close()
    metrics = ("sent", "dropped", "reached_udp")
    rows = [Row(name, *(statistics.median(getattr(r, m) for r in rs) for m in metrics)) for name, rs in runs.items()]
    return rows, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=10_000, help="deny-list size (the source is one of them)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window per setup and round")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of traffic before each window")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all setups; medians are printed")
    args = parser.parse_args()
    exit_on_sigterm()
    setup_logging("bench", "warning")  # the prefilter logs each attach and detach at info
    entries = [f"{SOURCE}/32", *filler_list(args.entries - 1)]
    rows, note = measure(entries, args.rounds, args.warmup, args.seconds)
    print(
        f"\n64-byte UDP from {SOURCE}, trafgen on one CPU, deny list of {len(entries):,} entries holding "
        f"the source;\nmedian of {args.rounds} rounds of {args.seconds:g} s per setup"
    )
    if note:
        print(f"note: {note}")
    print(f"\n{'setup':<26}{'sent/s':>13}{'dropped/s':>13}{'reached UDP/s':>15}")
    for row in rows:
        print(f"{row.setup:<26}{row.sent:>13,.0f}{row.dropped:>13,.0f}{row.reached_udp:>15,.0f}")
    ipt = rows[-1].dropped
    print()
    for row in rows[1:-1]:
        print(
            f"{row.setup} / iptables raw + ipset, drops/s: {row.dropped / ipt:.2f}"
            if ipt
            else f"{row.setup}: iptables dropped nothing, no ratio"
        )
    print(
        f"XDP mode used for the prefilter: {rows[1].setup.removeprefix('XDP prefilter (').rstrip(')')}"
        + ("; generic is shown beside it for comparison" if len(rows) == 4 else "")
    )


if __name__ == "__main__":
    main()

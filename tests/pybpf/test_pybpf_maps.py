"""Map round trips for every map type in the pybpf_maps fixture."""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
from collections.abc import Iterator
from ctypes import c_uint32, c_uint64
from pathlib import Path

import pytest

import pybpf
from pybpf import (
    BpfError,
    IncompatibleMapError,
    KeyExistsError,
    KeyNotFoundError,
    LpmKeyV4,
    LpmKeyV6,
    Map,
    MapFullError,
    MapType,
    ProgArray,
    SockHash,
    UpdateFlag,
)

SO_COOKIE = 57


class Pair(ctypes.Structure):
    _fields_ = [("packets", c_uint64), ("bytes", c_uint64)]


def ncpus() -> int:
    return pybpf._libbpf.possible_cpus()


def test_map_info_matches_declaration(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["hash_map"]
    assert (m.type, m.key_size, m.value_size, m.max_entries) == (MapType.HASH, 4, 16, 16)
    assert m.id > 0 and m.name == "hash_map"
    lpm = maps_obj.maps["lpm_v4"]
    assert lpm.type == MapType.LPM_TRIE and lpm.flags & 1  # BPF_F_NO_PREALLOC
    assert maps_obj.maps["percpu_hash"].is_percpu and not m.is_percpu


def test_hash_round_trip_with_flags(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["hash_map"].typed(c_uint32, Pair)
    m.update(1, Pair(3, 300), UpdateFlag.NOEXIST)
    got = m[1]
    assert (got.packets, got.bytes) == (3, 300)

    with pytest.raises(KeyExistsError) as exists:
        m.update(1, Pair(4, 400), UpdateFlag.NOEXIST)
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value) == "update map hash_map: key exists (EEXIST)"

    with pytest.raises(KeyNotFoundError) as missing:
        m.update(2, Pair(), UpdateFlag.EXIST)
    assert missing.value.errno == errno.ENOENT

    m.update(1, Pair(5, 500), UpdateFlag.EXIST)
    assert m[1].packets == 5
    assert m.lookup(2) is None and 2 not in m and 1 in m
    with pytest.raises(KeyError):  # KeyNotFoundError is also a KeyError
        m[2]

    m[2] = Pair(6, 600)
    assert sorted(m.keys()) == [1, 2]
    assert {k: v.bytes for k, v in m.items()} == {1: 500, 2: 600}

    m.delete(1)
    with pytest.raises(KeyNotFoundError, match="delete from map hash_map: key not found"):
        m.delete(1)
    assert list(m) == [2]


def test_full_hash_raises_map_full(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["tiny_hash"].typed(c_uint32, c_uint32)
    m[1], m[2] = 10, 20
    with pytest.raises(MapFullError, match="map is full") as full:
        m[3] = 30
    assert full.value.errno == errno.E2BIG
    m[2] = 21  # replacing an existing key still works when full
    assert m[2] == 21 and sorted(m.keys()) == [1, 2]


def test_array_keys_always_exist(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["array_map"].typed(c_uint32, c_uint32)
    assert list(m.keys()) == [0, 1, 2, 3]
    assert m[3] == 0
    with pytest.raises(KeyExistsError):
        m.update(0, 1, UpdateFlag.NOEXIST)
    m.update(3, 7, UpdateFlag.EXIST)
    assert m[3] == 7
    assert m.lookup(4) is None  # out of range
    with pytest.raises(BpfError) as cannot:
        m.delete(0)
    assert cannot.value.errno == errno.EINVAL and not isinstance(cannot.value, KeyNotFoundError)


def test_batch_update_and_delete(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["hash_map"].typed(c_uint32, Pair)
    keys = list(range(10))
    assert m.update_batch(keys, [Pair(k, k * 100) for k in keys]) == 10
    assert {k: v.bytes for k, v in m.items()} == {k: k * 100 for k in keys}

    with pytest.raises(KeyExistsError, match="key exists"):  # NOEXIST: key by key
        m.update_batch([3], [Pair()], UpdateFlag.NOEXIST)

    assert m.delete_batch(keys[:6]) == 6
    assert sorted(m.keys()) == keys[6:]
    with pytest.raises(KeyNotFoundError):
        m.delete_batch([0])
    assert m.clear() == 4 and list(m.keys()) == []


def test_batch_on_array_and_percpu(maps_obj: pybpf.BpfObject) -> None:
    array = maps_obj.maps["array_map"].typed(c_uint32, c_uint32)
    assert array.update_batch([0, 1, 2, 3], [10, 11, 12, 13]) == 4
    assert [array[k] for k in range(4)] == [10, 11, 12, 13]

    percpu = maps_obj.maps["percpu_hash"].typed(c_uint32, c_uint64)
    assert percpu.update_batch([1, 2], [5, [1] * ncpus()]) == 2
    assert percpu.lookup_sum(1) == 5 * ncpus()
    assert percpu.lookup_sum(2) == ncpus()


def test_percpu_hash_values(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["percpu_hash"].typed(c_uint32, c_uint64)
    n = ncpus()
    m.update(7, 3)  # one value, copied to every CPU
    assert m.lookup_percpu(7) == [3] * n
    m.update(7, list(range(1, n + 1)))
    assert m[7] == list(range(1, n + 1))
    assert m.lookup_sum(7) == n * (n + 1) // 2
    assert m.lookup_sum(8) is None
    with pytest.raises(ValueError, match="per-CPU values expected"):
        m.update(7, [1] * (n + 1))
    with pytest.raises(TypeError, match="not a per-CPU map"):
        maps_obj.maps["hash_map"].lookup_percpu(b"\0\0\0\0")


def test_percpu_array_sums_structures(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["percpu_array"].typed(c_uint32, Pair)
    n = ncpus()
    m.update(0, [Pair(i, 10 * i) for i in range(n)])
    total = m.lookup_sum(0)
    assert isinstance(total, Pair)
    assert (total.packets, total.bytes) == (sum(range(n)), 10 * sum(range(n)))


def test_lru_hash_evicts_instead_of_failing(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["lru_hash"].typed(c_uint32, c_uint64)
    for key in range(3 * m.max_entries):
        m[key] = key
    keys = list(m.keys())
    assert 0 < len(keys) <= m.max_entries
    assert m[3 * m.max_entries - 1] == 3 * m.max_entries - 1


def test_lpm_v4_longest_prefix_match(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["lpm_v4"].typed(LpmKeyV4, c_uint32)
    m.update_batch(
        [LpmKeyV4.of("10.0.0.0/8"), LpmKeyV4.of("10.1.0.0/16"), LpmKeyV4.of("10.1.2.0/24")],
        [8, 16, 24],
    )
    assert m.lookup(LpmKeyV4.of("10.1.2.3")) == 24
    assert m.lookup(LpmKeyV4.of(ipaddress.ip_address("10.1.9.9"))) == 16
    assert m.lookup(LpmKeyV4.of("10.200.0.1")) == 8
    assert m.lookup(LpmKeyV4.of("11.0.0.1")) is None
    assert {k.network() for k in m} == {ipaddress.ip_network(n) for n in ("10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24")}
    m.delete(LpmKeyV4.of("10.1.2.0/24"))
    assert m.lookup(LpmKeyV4.of("10.1.2.3")) == 16
    with pytest.raises(ValueError, match="not an IPv4"):
        LpmKeyV4.of("2001:db8::/32")


def test_lpm_v6_longest_prefix_match(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["lpm_v6"].typed(LpmKeyV6, c_uint32)
    m[LpmKeyV6.of("2001:db8::/32")] = 32
    m[LpmKeyV6.of("2001:db8:1::/48")] = 48
    assert m[LpmKeyV6.of("2001:db8:1::5")] == 48
    assert m[LpmKeyV6.of("2001:db8:2::5")] == 32
    assert m.lookup(LpmKeyV6.of("2001:db9::1")) is None


def test_key_and_value_types_are_checked(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["hash_map"]
    with pytest.raises(IncompatibleMapError, match="c_ulong is 8 bytes, the map's is 4 bytes") as wrong:
        m.typed(c_uint64, Pair)
    assert wrong.value.field == "key_size"
    with pytest.raises(IncompatibleMapError, match="value_size"):
        m.typed(c_uint32, c_uint32)
    small = maps_obj.maps["array_map"].typed(c_uint32, c_uint32)
    with pytest.raises(ValueError, match="does not fit"):
        small[0] = 1 << 40
    with pytest.raises(TypeError, match="expected Pair or bytes"):
        m.typed(c_uint32, Pair)[0] = 5


def test_untyped_maps_take_and_give_bytes(maps_obj: pybpf.BpfObject) -> None:
    m = maps_obj.maps["hash_map"]
    key = (9).to_bytes(4, "little")
    m[key] = bytes(Pair(1, 2))
    assert m[key] == bytes(Pair(1, 2))
    assert list(m.keys()) == [key]
    with pytest.raises(ValueError, match="3 bytes given"):
        m[b"abc"] = bytes(16)


def test_prog_array_slots(maps_obj: pybpf.BpfObject) -> None:
    calls = ProgArray(maps_obj.maps["prog_array"])
    target = maps_obj.programs["xdp_tail_target"]
    assert calls.get_id(0) is None
    calls.set(0, target)
    assert calls.get_id(0) == target.id
    assert calls.clear(0) is True
    assert calls.clear(0) is False
    assert calls.get_id(0) is None and len(calls) == 4
    with pytest.raises(ValueError, match="not PROG_ARRAY"):
        ProgArray(maps_obj.maps["hash_map"])


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A connected TCP pair on loopback: (client, server side)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
    with client, server:
        yield client, server


def test_sockhash_takes_a_tcp_socket(maps_obj: pybpf.BpfObject, tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    socks = SockHash(maps_obj.maps["sock_hash"])
    socks.update(1, client)
    socks[2] = server.fileno()
    cookie = int.from_bytes(client.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
    assert socks.cookie(1) == cookie
    assert sorted(socks.keys()) == [1, 2]
    with pytest.raises(KeyExistsError):
        socks.update(1, server, UpdateFlag.NOEXIST)
    socks.delete(1)
    assert socks.cookie(1) is None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(BpfError):
        socks.update(3, udp)  # a UDP socket cannot go in a sockhash


def test_pin_reopen_clone_and_close(maps_obj: pybpf.BpfObject, pin_dir: Path) -> None:
    original = maps_obj.maps["hash_map"].typed(c_uint32, Pair)
    original.pin(pin_dir / "hash")
    with pytest.raises(BpfError) as taken:
        original.pin(pin_dir / "hash")
    assert taken.value.errno == errno.EEXIST

    with Map.from_pin(pin_dir / "hash", key_type=c_uint32, value_type=Pair) as pinned:
        assert pinned.id == original.id and pinned.name == "hash_map"
        pinned[4] = Pair(4, 40)
    assert original[4].bytes == 40
    assert pinned.closed

    by_id = Map.from_id(original.id).typed(c_uint32, Pair)
    kept = original.clone()
    maps_obj.close()
    with pytest.raises(ValueError, match="closed"):
        original.lookup(4)
    assert kept[4].bytes == 40 and by_id[4].packets == 4
    kept.close()
    by_id.close()
    pybpf.unpin(pin_dir / "hash")
    with pytest.raises(BpfError) as gone:
        Map.from_pin(pin_dir / "hash")
    assert gone.value.errno == errno.ENOENT


def test_map_from_fd_must_be_a_map() -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(BpfError, match="not a BPF map"):
            Map(fd)
    finally:
        os.close(fd)


def test_create_map_from_user_space() -> None:
    with pybpf.Map.create(pybpf.MapType.HASH, 4, 8, 2, name="created", key_type=c_uint32, value_type=c_uint64) as m:
        assert (m.type, m.key_size, m.value_size, m.max_entries, m.name) == (pybpf.MapType.HASH, 4, 8, 2, "created")
        m[1] = 10
        m[2] = 20
        assert dict(m.items()) == {1: 10, 2: 20}
        with pytest.raises(pybpf.MapFullError):
            m[3] = 30
    with pytest.raises(pybpf.BpfError) as err:
        pybpf.Map.create(pybpf.MapType.LPM_TRIE, 8, 8, 16)  # an LPM trie must be BPF_F_NO_PREALLOC
    assert err.value.errno == errno.EINVAL

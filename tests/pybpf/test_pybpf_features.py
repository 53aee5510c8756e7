"""Feature probes answer yes/no, or raise NotSupportedError on demand."""

from __future__ import annotations

import pytest

from pybpf import (
    MapType,
    NotSupportedError,
    ProgType,
    has_map_type,
    has_prog_type,
    require_map_type,
    require_prog_type,
)


def test_supported_types() -> None:
    for map_type in (MapType.HASH, MapType.LPM_TRIE, MapType.RINGBUF, MapType.SOCKHASH):
        assert has_map_type(map_type)
        require_map_type(map_type)
    for prog_type in (ProgType.XDP, ProgType.SCHED_CLS, ProgType.SK_MSG, ProgType.CGROUP_SOCK_ADDR):
        assert has_prog_type(prog_type)
        require_prog_type(prog_type)


def test_unknown_types_are_not_supported() -> None:
    unknown_map, unknown_prog = MapType(250), ProgType(250)
    assert unknown_map.name == "UNKNOWN_250"
    assert not has_map_type(unknown_map)
    assert not has_prog_type(unknown_prog)
    with pytest.raises(NotSupportedError, match="map type UNKNOWN_250: not supported"):
        require_map_type(unknown_map)
    with pytest.raises(NotSupportedError, match="program type UNKNOWN_250"):
        require_prog_type(unknown_prog)

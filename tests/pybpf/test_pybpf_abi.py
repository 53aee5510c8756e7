"""The ctypes mirrors in pybpf._libbpf match the C headers byte for byte.

A small C program compiled against the installed libbpf and kernel headers
prints every field's offset and each struct's size; a mismatch here means a
call would pass libbpf a struct it misreads.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from pybpf import _libbpf

MIRRORS: dict[str, tuple[type[ctypes.Structure], bool]] = {
    # C struct name: (mirror, whether the whole size must match)
    "bpf_object_open_opts": (_libbpf.bpf_object_open_opts, True),
    "bpf_test_run_opts": (_libbpf.bpf_test_run_opts, True),
    "bpf_map_batch_opts": (_libbpf.bpf_map_batch_opts, True),
    "bpf_tc_hook": (_libbpf.bpf_tc_hook, True),
    "bpf_tc_opts": (_libbpf.bpf_tc_opts, True),
    "bpf_xdp_attach_opts": (_libbpf.bpf_xdp_attach_opts, True),
    "bpf_xdp_query_opts": (_libbpf.bpf_xdp_query_opts, True),
    "bpf_map_info": (_libbpf.bpf_map_info, True),
    "bpf_prog_info": (_libbpf.bpf_prog_info, True),
    "bpf_link_info": (_libbpf.bpf_link_info_head, False),
    "bpf_link_update_opts": (_libbpf.bpf_link_update_opts, True),
}
# Mirror fields that stand for a member of a C union: the C designator for offsetof.
UNION_MEMBERS = {"cgroup_id": "cgroup.cgroup_id", "cgroup_attach_type": "cgroup.attach_type"}


def _named_fields(mirror: type[ctypes.Structure]) -> list[str]:
    """Fields C can name with offsetof: not the padding stand-ins, not bitfields."""
    return [f[0] for f in mirror._fields_ if not f[0].startswith("_") and len(f) == 2]


def test_struct_layouts_match_headers(tmp_path: Path) -> None:
    compiler = shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        pytest.skip("no C compiler")
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <bpf/bpf.h>", "#include <bpf/libbpf.h>"]
    lines.append("int main(void) {")
    for c_name, (mirror, _) in MIRRORS.items():
        lines.append(f'printf("{c_name} sizeof %zu\\n", sizeof(struct {c_name}));')
        for field in _named_fields(mirror):
            member = UNION_MEMBERS.get(field, field)
            lines.append(f'printf("{c_name} {field} %zu\\n", offsetof(struct {c_name}, {member}));')
    lines.append("return 0; }")
    source, binary = tmp_path / "layout.c", tmp_path / "layout"
    source.write_text("\n".join(lines))
    subprocess.run([compiler, str(source), "-o", str(binary)], check=True)
    reported = subprocess.run([str(binary)], check=True, capture_output=True, text=True).stdout

    mismatches = []
    for line in reported.splitlines():
        c_name, field, value = line.split()
        mirror, whole = MIRRORS[c_name]
        if field == "sizeof":
            ours = ctypes.sizeof(mirror)
            if whole and ours != int(value):
                mismatches.append(f"sizeof {c_name}: C {value}, ctypes {ours}")
        elif (ours := getattr(mirror, field).offset) != int(value):
            mismatches.append(f"{c_name}.{field}: C offset {value}, ctypes {ours}")
    assert not mismatches
    assert reported.count("sizeof") == len(MIRRORS)

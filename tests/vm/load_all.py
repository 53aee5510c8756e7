"""Load every program of every object in bpf/build on the running kernel: `python -m tests.vm.load_all [JSON [BUILD]]`.

Why: the verifier of an older kernel (Debian 12's 6.1) explores more states than the
host's, so a program the host accepts may be refused there ("BPF program is too large").
Each program is loaded alone (the others of its object not autoloaded) with fresh maps
pinned under a scratch bpffs directory, so one refusal does not hide the next. For each
program it reports ok or the verifier's last lines, and the processed-instruction count
(the verifier's stats, log level 4). Exit status 1 when any program is refused.
"""

from __future__ import annotations

import ctypes
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from pybpf import BpfObject, _libbpf

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "bpf" / "build"
BPFFS = Path("/sys/fs/bpf")
LOG_STATS = 4
LOG_VERBOSE = 1
STATS_BUF = 1 << 16
VERBOSE_BUF = 1 << 24
TAIL_LINES = 12
COMPLEXITY_LIMIT = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS
_PROCESSED = re.compile(r"processed (\d+) insns")
REFUSED_ON_PURPOSE = {"pybpf_reject.o"}  # pybpf's test that a refusal carries the verifier's log

_set_autoload = _libbpf.lib.bpf_program__set_autoload
_set_autoload.argtypes = [ctypes.c_void_p, ctypes.c_bool]
_set_autoload.restype = ctypes.c_int
_set_log_level = _libbpf.lib.bpf_program__set_log_level
_set_log_level.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
_set_log_level.restype = ctypes.c_int
_set_log_buf = _libbpf.lib.bpf_program__set_log_buf
_set_log_buf.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
_set_log_buf.restype = ctypes.c_int


def program_names(path: Path) -> list[str]:
    with BpfObject.open(path) as obj:
        return list(obj.program_specs)


def _load_one(path: Path, program: str, level: int, size: int) -> tuple[bool, str, str]:
    """Load `program` of `path` alone at log `level`; (loaded, verifier log, error text)."""
    scratch = Path(tempfile.mkdtemp(prefix="weir-load-all-", dir=BPFFS))
    buf = ctypes.create_string_buffer(size)
    try:
        obj = BpfObject.open(path, pin_root=scratch)
        try:
            for ptr in obj._iter_ptrs(_libbpf.bpf_object__next_program):
                mine = _libbpf.bpf_program__name(ptr).decode() == program
                _set_autoload(ptr, mine)
                if mine:
                    _set_log_level(ptr, level)
                    _set_log_buf(ptr, ctypes.addressof(buf), size)
            try:
                obj.load()
            except Exception as err:
                return False, buf.value.decode(errors="replace"), str(err)
            return True, buf.value.decode(errors="replace"), ""
        finally:
            obj.close()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def check_program(path: Path, program: str) -> dict[str, Any]:
    loaded, stats, error = _load_one(path, program, LOG_STATS, STATS_BUF)
    found = _PROCESSED.findall(stats)
    result: dict[str, Any] = {"ok": loaded, "processed": int(found[-1]) if found else None}
    if loaded:
        return result
    result["error"] = error.splitlines()[0] if error else ""
    if result["processed"] is not None and result["processed"] > COMPLEXITY_LIMIT:
        # the verbose log of a million instructions would be cut before its last words (before 6.4)
        result["log_tail"] = [f"BPF program is too large. Processed {result['processed']} insn", *stats.splitlines()]
        return result
    _, log, error = _load_one(path, program, LOG_VERBOSE | LOG_STATS, VERBOSE_BUF)
    result["log_tail"] = [line for line in log.splitlines() if line.strip()][-TAIL_LINES:]
    return result


def _print(name: str, r: dict[str, Any]) -> None:
    print(f"{'ok  ' if r['ok'] else 'FAIL'} {name:45} processed={r['processed']}", flush=True)
    if not r["ok"]:
        print(f"     {r['error']}")
        for line in r["log_tail"]:
            print(f"     | {line}", flush=True)


def check_all(build: Path = BUILD, verbose: bool = True) -> dict[str, dict[str, Any]]:
    """{"object.o:program": {"ok", "processed", ["error", "log_tail"]}} for every program."""
    results = {}
    for path in sorted(build.glob("*.o")):
        if path.name in REFUSED_ON_PURPOSE:
            continue
        for program in program_names(path):
            name = f"{path.name}:{program}"
            results[name] = check_program(path, program)
            if verbose:
                _print(name, results[name])
    return results


def main(argv: list[str]) -> int:
    """argv: [JSON output [build directory]]."""
    results = check_all(Path(argv[2]) if len(argv) > 2 else BUILD)
    if len(argv) > 1:
        Path(argv[1]).write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))

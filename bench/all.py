"""Every benchmark in turn, and one summary table: measure, Weir, reference, ratio.

Each module of `bench/` that has `summary_rows(quick: bool = False) -> list[tuple[str,
float, float, float]]` (measure, Weir's figure, the reference's, their ratio; a
module may instead take sizes as keyword arguments with defaults) is run in a process
of its own, one after the other, so a failing or interrupted benchmark cleans up after
itself and the others still run. Modules without `summary_rows` are named as skipped.
`--quick` asks each module for smaller sizes (`quick=True`, or the sizes in
QUICK_KWARGS): a first look in minutes, not the issue's figures.

    sudo .venv/bin/python -m bench.all [--quick] [--only prefilter_cost,chain_cost] [--timeout S]
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import pkgutil
import subprocess
import sys
import time
from pathlib import Path

import bench

ROW_MARK = "WEIR-SUMMARY-ROWS "
NOT_BENCHMARKS = {"all", "ab", "netbench"}  # the runners and shared helpers
# The table first, in its order; any other module with summary_rows after them.
ORDER = ["prefilter_load_time", "policy_import", "lb_program", "lb_connect_rate", "prefilter_cost", "chain_cost"]

Row = tuple[str, float, float, float]
# --quick for modules whose summary_rows takes sizes rather than `quick`: smaller sizes by
# parameter name, passed only where the function has that parameter.
QUICK_KWARGS: dict[str, dict[str, object]] = {
    "policy_import": {"rules": 1_000},
    "lb_program": {"services": 1_000},
    "lb_connect_rate": {"services": 1_000, "seconds": 1.0, "rounds": 3},
    "lb_vip_profile": {"services": 1_000, "seconds": 1.0, "rounds": 2},
}


def modules() -> list[str]:
    found = [m.name for m in pkgutil.iter_modules(bench.__path__) if m.name not in NOT_BENCHMARKS]
    return sorted(found, key=lambda name: (ORDER.index(name) if name in ORDER else len(ORDER), name))


def has_rows(name: str) -> bool:
    """Whether a module defines summary_rows, read from its source (importing may need root or packages)."""
    source = (Path(bench.__path__[0]) / f"{name}.py").read_text()
    return "\ndef summary_rows(" in source


def child(name: str, quick: bool) -> None:
    """In the child process: run one module's summary_rows and print them on one marked line."""
    rows_of = importlib.import_module(f"bench.{name}").summary_rows
    parameters = inspect.signature(rows_of).parameters
    kwargs: dict[str, object] = {}
    if quick:
        kwargs = {"quick": True} if "quick" in parameters else {}
        kwargs |= {k: v for k, v in QUICK_KWARGS.get(name, {}).items() if k in parameters}
    rows = rows_of(**kwargs)
    print(ROW_MARK + json.dumps([[str(m), float(w), float(r), float(q)] for m, w, r, q in rows]), flush=True)


def run_module(name: str, quick: bool, timeout: float) -> tuple[list[Row], str]:
    """(rows, note): the rows a module gave, or none and why."""
    argv = [sys.executable, "-m", "bench.all", "--child", name, *(["--quick"] if quick else [])]
    started = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return [], f"timed out after {timeout:g} s"
    sys.stdout.write(done.stdout.replace(ROW_MARK, "rows: "))
    marked = [line for line in done.stdout.splitlines() if line.startswith(ROW_MARK)]
    if done.returncode != 0 or not marked:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return [], f"failed: {tail[0]}"
    rows = [(m, w, r, q) for m, w, r, q in json.loads(marked[-1][len(ROW_MARK) :])]
    return rows, f"{time.monotonic() - started:.0f} s"


def table(rows: list[Row]) -> str:
    width = max([len("measure"), *(len(r[0]) for r in rows)])
    lines = [f"{'measure':<{width}}  {'Weir':>12}  {'reference':>12}  {'ratio':>7}", "-" * (width + 39)]
    lines += [f"{m:<{width}}  {w:>12.4g}  {r:>12.4g}  {q:>7.2f}" for m, w, r, q in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes: minutes, not the issue's figures")
    parser.add_argument("--only", default="", help="comma-separated module names (default: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one module may take")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick)
        return
    wanted = [m for m in args.only.split(",") if m]
    names = [m for m in modules() if not wanted or m in wanted]
    rows: list[Row] = []
    notes: list[str] = []
    for name in names:
        if not has_rows(name):
            notes.append(f"{name}: skipped (no summary_rows)")
            continue
        print(f"== bench.{name}{' --quick' if args.quick else ''}", flush=True)
        got, note = run_module(name, args.quick, args.timeout)
        rows += got
        notes.append(f"{name}: {note}")
    print(f"\nsummary{' (--quick sizes)' if args.quick else ''}; ratio = Weir / reference, as each measure says")
    print(table(rows))
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()

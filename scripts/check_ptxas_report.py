"""Summarise ptxas's resource report (nvcc -Xptxas=-v) from a build log and fail on spills.

Usage: python scripts/check_ptxas_report.py build/cmake.log [--strict REGEX] [--json out.json]

Prints registers and spill bytes per kernel and architecture; exits 1 when a kernel whose
name matches --strict (default: the fused attention and rotary kernels) spills registers to
local memory (a spill in a fused kernel's main loop costs far more than the register it
saves). Spills elsewhere are listed as warnings.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True
        ).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return names
    return out if len(out) == len(names) else names


def parse(log: str) -> list[dict]:
    kernels: list[dict] = []
    current: dict | None = None
    for line in log.splitlines():
        if m := _ENTRY.search(line):
            current = {"kernel": m.group(1), "arch": m.group(2)}
            kernels.append(current)
        elif current is not None and (m := _SPILL.search(line)):
            current["stack"], current["spill_stores"], current["spill_loads"] = map(int, m.groups())
        elif current is not None and (m := _REGS.search(line)):
            current["registers"] = int(m.group(1))
    for kernel, name in zip(kernels, demangle([k["kernel"] for k in kernels]), strict=True):
        kernel["kernel"] = name
    return kernels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument(
        "--strict", default=r"omnivmed::(attention|rope)::", help="kernels that must not spill"
    )
    args = parser.parse_args()
    kernels = parse(args.log.read_text(errors="replace"))
    if not kernels:
        print(f"no ptxas resource report in {args.log} (CPU-only build?)")
        return 0
    seen = set()
    for k in sorted(kernels, key=lambda k: (k["kernel"], k["arch"])):
        key = (k["kernel"], k["arch"])
        if key in seen:
            continue
        seen.add(key)
        short = k["kernel"].replace("(anonymous namespace)::", "").replace("omnivmed::", "")
        short = short.split("(")[0]
        print(
            f"{k['arch']:6} regs {k.get('registers', '?'):>3}  spill st/ld "
            f"{k.get('spill_stores', '?')}/{k.get('spill_loads', '?')}  {short}"
        )
    if args.json:
        args.json.write_text(json.dumps(kernels, indent=1))
    spilling = [k for k in kernels if k.get("spill_stores", 0) or k.get("spill_loads", 0)]
    strict = re.compile(args.strict)
    failing = [k for k in spilling if strict.search(k["kernel"])]
    for k in spilling:
        level = "ERROR" if k in failing else "warning"
        print(f"{level}: {k['arch']} {k['kernel']} spills registers", file=sys.stderr)
    if failing:
        return 1
    print(f"ptxas: {len(seen)} kernel builds, no register spills in kernels matching {args.strict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

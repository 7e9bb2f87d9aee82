#!/usr/bin/env python3
"""Wall time of `fitquant hw --json` (Python start included), best of N, and what it reported."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(runs: int = 5) -> int:
    exe = str(ROOT / ".venv" / "bin" / "fitquant")
    walls = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([exe, "hw", "--json"], capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - start)
    data = json.loads(done.stdout)
    print(f"{'command':<24} {'best (s)':>9} {'median (s)':>11}")
    print(f"{'fitquant hw --json':<24} {min(walls):>9.3f} {sorted(walls)[len(walls) // 2]:>11.3f}")
    print(f"devices: {len(data['devices'])}, RAM {data['ram_total_bytes'] / 2**30:.1f} GiB total, "
          f"{data['ram_available_bytes'] / 2**30:.1f} GiB available")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 5))

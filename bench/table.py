"""Markdown table of a pytest-benchmark JSON: median per case, and each backend's speedup over the reference.

    python bench/table.py bench/results/cpu-2026-11-22.json > bench/results/cpu-2026-11-22.md
"""

import json
import sys


def main(path: str) -> None:
    data = json.load(open(path))
    rows = {}
    for bench in data["benchmarks"]:
        info = dict(bench["extra_info"])
        backend = info.pop("backend")
        key = tuple(sorted(info.items()))
        rows.setdefault(key, {})[backend] = bench["stats"]["median"]
    backends = sorted({b for r in rows.values() for b in r}, key=lambda b: (b != "reference", b))
    machine = data.get("machine_info", {})
    print(f"Machine: {machine.get('cpu', {}).get('brand_raw', '?')}, {machine.get('cpu', {}).get('count', '?')} cores; "
          f"torch threads as configured; medians in ms.\n")
    print("| case | " + " | ".join(f"{b} (ms)" for b in backends) + " | " +
          " | ".join(f"{b} vs reference" for b in backends if b != "reference") + " |")
    print("|---" * (1 + 2 * len(backends) - 1) + "|")
    for key, times in sorted(rows.items()):
        case = ", ".join(f"{k}={v}" for k, v in key)
        cells = [f"{times[b] * 1e3:.3f}" if b in times else "-" for b in backends]
        ratios = [f"{times['reference'] / times[b]:.1f}x" if b in times and "reference" in times else "-"
                  for b in backends if b != "reference"]
        print(f"| {case} | " + " | ".join(cells + ratios) + " |")


if __name__ == "__main__":
    main(sys.argv[1])

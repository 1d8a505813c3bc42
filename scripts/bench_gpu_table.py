#!/usr/bin/env python3
"""The README's GPU speed table from the bench_simulation.json files under a directory
(``bench_gpu.sh`` writes them): one row per run, one column per network and batch size, each
cell image-steps per second with its ratio to T ANN forward passes and to SpikingJelly's IF."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_gpu")
    benches = [json.loads(p.read_text()) for p in sorted(root.glob("*/bench_simulation.json"))]
    if not benches:
        raise SystemExit(f"{root}: no */bench_simulation.json")
    columns = [f"{b['model']} {'x'.join(str(v) for v in b.get('shape', []))} batch {b['batch_size']}"
               .replace("  ", " ") for b in benches]
    runs = list(dict.fromkeys(r["run"] for b in benches for r in b["rows"]))
    device = sorted({b["device"] for b in benches})
    print(f"device {', '.join(device)}; torch {benches[0].get('torch', '?')}; rate codes T = {benches[0]['timesteps']}")
    print("| run | " + " | ".join(columns) + " |")
    print("| --- |" + " --- |" * len(columns))
    for run in runs:
        cells = []
        for b in benches:
            row = next((r for r in b["rows"] if r["run"] == run), None)
            timed = {r["run"]: r for r in b["rows"] if "image_steps_per_second" in r}
            if row is None or "image_steps_per_second" not in row:
                cells.append(row["note"] if row else "-")
                continue
            rate = row["image_steps_per_second"]
            ann = next((r for n, r in timed.items() if n.startswith("ANN")), None)
            sj = next((r for n, r in timed.items() if n.startswith("SpikingJelly")), None)
            ratios = [f"{rate / ann['image_steps_per_second']:.2f}x ANN" if ann else None,
                      f"{rate / sj['image_steps_per_second']:.2f}x SJ" if sj and row is not sj else None]
            cells.append(f"{rate:,.0f} ({', '.join(r for r in ratios if r)})")
        print(f"| {run} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

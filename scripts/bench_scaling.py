#!/usr/bin/env python3
"""Data-parallel scaling of ``ann2snn evaluate``: image-steps per second against the number of
ranks, each rank a process started by torchrun (CPU processes here, one GPU per rank where
there are GPUs), and the efficiency per rank (rate on N ranks / (N x rate on 1 rank)).

  python scripts/bench_scaling.py --ranks 1,2 --neuron if --timesteps 64 [--device cpu]

By default it calibrates and converts the bundled LeNet-5 and evaluates it on the bundled 1,000
MNIST test images; ``--checkpoint/--model/--dataset`` point it at your own. Every run's report
must equal the single-rank one (apart from timing): the table says so. Writes
``OUT/bench_scaling.json``. The wall time includes start-up (process group, loading); the rate
is the simulation's own (``timing`` in each report: the slowest rank's simulation time).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

ASSETS = Path(__file__).resolve().parents[1] / "ann2snn" / "assets"


def ann2snn(*args, ranks: int = 0, threads: int | None = None) -> float:
    """Run the CLI (under torchrun with ``ranks`` > 0); returns the wall time."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] \
        if ranks else [sys.executable]
    start = time.perf_counter()
    done = subprocess.run([*launcher, "-m", "ann2snn", *map(str, args)], env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_scaling: {' '.join(map(str, args[:2]))} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", default="1,2", help="numbers of ranks to try, e.g. 1,2,4")
    p.add_argument("--checkpoint", type=Path, default=ASSETS / "lenet5_mnist.safetensors")
    p.add_argument("--model", default="lenet5")
    p.add_argument("--calibration-data", default=str(ASSETS / "mnist_calib.safetensors"))
    p.add_argument("--dataset", default=str(ASSETS / "mnist_test.safetensors"))
    p.add_argument("--neuron", default="if")
    p.add_argument("--timesteps", type=int, default=64)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads-per-rank", type=int, default=1, help="OMP threads of each CPU rank")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("runs/bench_scaling"))
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ann2snn("calibrate", a.checkpoint, "-m", a.model, "-d", a.calibration_data, "-o", tmp / "p.json",
                "--neuron", a.neuron, "--device", a.device)
        ann2snn("convert", a.checkpoint, "-m", a.model, "-c", tmp / "p.json", "-o", tmp / "s.snn")
        reference = None
        for n in (int(v) for v in a.ranks.split(",")):
            rep = tmp / f"r{n}"
            wall = ann2snn("evaluate", tmp / "s.snn", "-m", a.model, "-d", a.dataset, "-T", a.timesteps,
                           "--batch-size", a.batch_size, "--device", a.device, "-r", rep,
                           *(["--limit", a.limit] if a.limit else []), ranks=n, threads=a.threads_per_rank)
            report = json.loads((rep / "report.json").read_text())
            timing = report.pop("timing")
            report.get("provenance", {}).pop("command", None)  # names its own report folder
            reference = reference or report
            rows.append({"ranks": n, "wall_s": round(wall, 2), "simulation_s": timing["seconds"],
                         "image_steps_per_second": timing["image_steps_per_second"],
                         "same_report_as_1_rank": report == reference})
    base = rows[0]["image_steps_per_second"] / rows[0]["ranks"]
    for r in rows:
        r["efficiency_per_rank"] = round(r["image_steps_per_second"] / (r["ranks"] * base), 3)
    table = Table(title=f"evaluate, {a.neuron.upper()}, T = {a.timesteps}, device {a.device}, "
                        f"{a.threads_per_rank} thread(s) per rank, {os.cpu_count()} CPUs")
    for col in ("ranks", "image-steps/s", "efficiency per rank", "simulation s", "wall s", "same report"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["ranks"]), f"{r['image_steps_per_second']:,.0f}", f"{r['efficiency_per_rank']:.2f}",
                      f"{r['simulation_s']:.2f}", f"{r['wall_s']:.1f}", "yes" if r["same_report_as_1_rank"] else "NO")
    Console(width=160).print(table)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "bench_scaling.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                                          "rows": rows}, indent=1) + "\n")
    print(f"wrote {a.out}/bench_scaling.json")


if __name__ == "__main__":
    main()

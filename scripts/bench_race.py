#!/usr/bin/env python3
"""The operating-point race against the full search: ``calibrate`` with every default for a
neuron (ASN unless --neuron), once with the candidates racing (``search/race.py``, the default)
and once with every candidate on every search image, on the same checkpoint and images.
Prints the wall time, the choice, its cost and the images each candidate ran on; writes JSON.

  python scripts/bench_race.py --model lenet5 --dataset mnist \\
      --checkpoint checkpoints/lenet5_mnist_fit.safetensors --data-dir ~/data
  python scripts/bench_race.py --model resnet18 --model-arg width=16 --dataset fashion-mnist \\
      --checkpoint scripts/reference/resnet18_16_fmnist.safetensors --race-only
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from ann2snn.app import pipeline
from ann2snn.app.cli import key_values
from ann2snn.io.files import write_text
from ann2snn.options import DataSource
from ann2snn.search import race
from ann2snn.search.operating_point import setting_text


def calibrate(args, user: dict, profile: Path) -> dict:
    start = time.perf_counter()
    prof, _ = pipeline.calibrate(args.checkpoint, args.model, args.dataset, profile, neuron=args.neuron,
                                 device=args.device, source=DataSource(args.data_dir), model_args=user)
    seconds = time.perf_counter() - start
    record = prof.operating_point
    keys = list(record.candidates[0])[:list(record.candidates[0]).index("final_error")]
    return {"seconds": round(seconds, 1), "chosen": setting_text({k: record.chosen[k] for k in keys}),
            "cost": record.chosen["cost"], "bar_met": record.bar_met, "search_images": record.samples,
            "images_per_candidate": [c.get("images", record.samples) for c in record.candidates]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--neuron", default="asn")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--race-only", action="store_true", help="leave out the full search (it takes ten full runs)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_race"))
    args = p.parse_args()
    user = key_values(args.model_arg, "--model-arg")
    result = {"model": args.model, "model_args": user, "dataset": args.dataset, "neuron": args.neuron}
    with tempfile.TemporaryDirectory() as tmp:
        result["race"] = calibrate(args, user, Path(tmp) / "race.json")
        print("race:", result["race"], flush=True)
        if not args.race_only:
            race.FIRST = 1 << 40  # one round: every candidate on every search image
            result["full"] = calibrate(args, user, Path(tmp) / "full.json")
            print("full search:", result["full"], flush=True)
    print(f"\n{args.model} on {args.dataset}, calibrate --neuron {args.neuron} with every default")
    print("| search | seconds | chosen | cost (x IF's spikes) | images per candidate |")
    print("| --- | --- | --- | --- | --- |")
    for name in ("race", "full"):
        if name in result:
            r = result[name]
            cost = "-" if r["cost"] is None else f"{r['cost']:.3f}"
            print(f"| {name} | {r['seconds']:,.1f} | {r['chosen']} | {cost} | "
                  f"{', '.join(str(n) for n in r['images_per_candidate'])} |")
    if "full" in result:
        result["same_choice"] = result["race"]["chosen"] == result["full"]["chosen"]
        print(f"same choice: {result['same_choice']}")
    write_text(args.out / "bench_race.json", json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_race.json'}")


if __name__ == "__main__":
    main()

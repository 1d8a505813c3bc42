#!/usr/bin/env python3
"""Simulation speed: ann2snn (IF and ASN, layered and step-by-step engines) against SpikingJelly's
``ann2snn`` (RateCodingRecipe, 99.9th percentile) and against T plain ANN forward passes, on the
same images, time steps and device. Prints a table and writes JSON.

  pip install -e '.[bench]'        # SpikingJelly, an optional extra, never a runtime dependency
  python scripts/bench_simulation.py --model lenet5 --dataset mnist \\
      --checkpoint checkpoints/lenet5_mnist.safetensors --timesteps 64 --images 2048 --out runs/bench_sim

Image-steps per second = images x T / wall time of the simulation (data already in memory,
calibration and conversion not timed; on CUDA after an untimed warm-up run, so Triton's
one-time kernel compilation, about a second per process, is left out). Peak memory: CUDA
allocator peak on a GPU; on the CPU the growth of the process's resident set (ru_maxrss)
during the run, a coarse figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from ann2snn.app import pipeline
from ann2snn.store.artifact import load_artifact
from ann2snn.app.cli import key_values
from ann2snn.io.data import open_dataset
from ann2snn.sim.energy import fanout_maps
from ann2snn.io.files import write_text
from ann2snn.options import DataSource
from ann2snn.neurons.readout import Readout
from ann2snn.sim.simulate import resolve_device, simulate


def _timed(device: torch.device, fn):
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024)
    return result, seconds, peak


def ours(artifact: Path, data, T: int, batch: int, device: torch.device, engine: str) -> tuple[float, float, float]:
    art = load_artifact(artifact)
    layers = art.meta.layer_names
    fan = fanout_maps(art.ann, tuple(art.meta.input.shape))
    sim, seconds, peak = _timed(device, lambda: simulate(art.snn, layers, fan, data, T, batch, device, Readout(),
                                                         engine=engine))
    return float(sim.metric[-1]) / len(data), seconds, peak


def ann_passes(artifact: Path, data, T: int, batch: int, device: torch.device) -> tuple[float, float, float]:
    ann = load_artifact(artifact).ann.to(device).eval()

    def run():
        with torch.inference_mode():
            for x, _ in data.batches(batch):
                x = x.to(device)
                for _ in range(T):
                    ann(x)
    _, seconds, peak = _timed(device, run)
    return float("nan"), seconds, peak


def spikingjelly(model, calib, data, T: int, batch: int, device: torch.device) -> tuple[float, float, float] | str:
    try:
        from spikingjelly.activation_based import functional
        from spikingjelly.activation_based.ann2snn import Converter, RateCodingRecipe
    except ImportError as exc:
        return f"not importable ({exc}; pip install -e '.[bench]')"
    loader = [x for x, _ in calib.batches(batch)]
    snn = Converter(RateCodingRecipe(loader, mode="99.9%"), device=device).convert(model.to(device).eval())

    def run():
        correct = 0
        with torch.inference_mode():
            for x, y in data.batches(batch):
                x, y = x.to(device), y.to(device)
                functional.reset_net(snn)
                total = 0
                for _ in range(T):
                    total = total + snn(x)
                correct += int((total.argmax(1) == y).sum())
        return correct / len(data)
    return _timed(device, run)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/lenet5_mnist.safetensors"))
    p.add_argument("--timesteps", type=int, default=64)
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 'ASN steps'")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sim"))
    args = p.parse_args()
    device = resolve_device(args.device)
    user = key_values(args.model_arg, "--model-arg")
    T, B = args.timesteps, args.batch_size
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for neuron in ("if", "asn"):
            profile = Path(tmp) / f"{neuron}.json"
            pipeline.calibrate(args.checkpoint, args.model, args.dataset, profile, neuron=neuron, device=str(device),
                               source=DataSource(args.data_dir), model_args=user)
            artifacts[neuron] = Path(tmp) / f"{neuron}.snn.safetensors"
            pipeline.convert(args.checkpoint, profile, artifacts[neuron])
        norm = load_artifact(artifacts["if"]).meta.input.normalize
        data = open_dataset(args.dataset, "test", args.data_dir, False, norm).head(args.images)
        calib = open_dataset(args.dataset, "train", args.data_dir, False, norm).head(1024)
        runs = [("ANN x T forward passes", lambda d: ann_passes(artifacts["if"], d, T, B, device))]
        for neuron in ("if", "asn"):
            for engine in ("layers", "steps"):
                runs.append((f"ann2snn {neuron.upper()} {engine}",
                             lambda d, n=neuron, e=engine: ours(artifacts[n], d, T, B, device, e)))
        from ann2snn.io.checkpoint import load_model
        from ann2snn.io.zoo import model_kwargs
        model = load_model(args.model, model_kwargs(args.model, data.sample_shape, data.num_classes, user),
                           args.checkpoint)
        runs.append(("SpikingJelly IF (RateCodingRecipe 99.9%)",
                     lambda d: spikingjelly(model, calib, d, T, B, device)))
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        for name, run in runs:
            if any(s in name for s in skip):
                continue
            if device.type == "cuda":  # untimed warm-up: kernel compilation and cuDNN set-up happen once
                run(data.head(min(len(data), B)))
                run(data.head(len(data) % B or B))  # the last batch's size may compile its own variant
            result = run(data)
            if isinstance(result, str):
                rows.append({"run": name, "note": result})
                print(f"{name}: {result}", flush=True)
                continue
            acc, seconds, peak = result
            rows.append({"run": name, "accuracy": acc, "seconds": round(seconds, 3),
                         "image_steps_per_second": round(len(data) * T / seconds, 1),
                         "peak_memory_mb": round(peak / 2**20, 1)})
            print(f"{name}: {rows[-1]['image_steps_per_second']:,.0f} image-steps/s", flush=True)
    base = {r["run"]: r for r in rows if "image_steps_per_second" in r}
    sj = next((r for r in rows if r["run"].startswith("SpikingJelly") and "image_steps_per_second" in r), None)
    ann_row = base["ANN x T forward passes"]
    print(f"\n{args.model} on {args.dataset}, {len(data)} images, T={T}, batch {B}, device {device} "
          f"({torch.get_num_threads()} CPU threads)")
    print("| run | accuracy | image-steps/s | vs SpikingJelly | vs T ANN passes | peak memory MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['run']} | {r['note']} | | | | |")
            continue
        ratio_sj = f"{r['image_steps_per_second'] / sj['image_steps_per_second']:.2f}x" if sj else "-"
        ratio_ann = f"{r['image_steps_per_second'] / ann_row['image_steps_per_second']:.2f}x"
        acc = "-" if r["accuracy"] != r["accuracy"] else f"{100 * r['accuracy']:.2f}%"
        print(f"| {r['run']} | {acc} | {r['image_steps_per_second']:,.0f} | {ratio_sj} | {ratio_ann} | "
              f"{r['peak_memory_mb']:,.1f} |")
    summary = {"model": args.model, "dataset": args.dataset, "images": len(data), "timesteps": T, "batch_size": B,
               "device": str(device), "cpu_threads": torch.get_num_threads(), "rows": rows}
    write_text(args.out / "bench_simulation.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_simulation.json'}")


if __name__ == "__main__":
    main()

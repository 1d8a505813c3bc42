#!/usr/bin/env python3
"""Simulation speed of every neuron type: ann2snn IF, ASN, VSN and TTFS (layered engine, and
optionally the step-by-step reference) against SpikingJelly's ``ann2snn`` (RateCodingRecipe,
99.9th percentile) and against T plain ANN forward passes, on the same checkpoint, images and
device. Prints a table and writes JSON.

  pip install -e '.[bench]'        # SpikingJelly, an optional extra, never a runtime dependency
  python scripts/bench_simulation.py --model lenet5 --dataset mnist \\
      --checkpoint checkpoints/lenet5_mnist.safetensors --timesteps 64 --images 2048 --out runs/bench_sim
  python scripts/bench_simulation.py --model resnet18 --model-arg width=16 --dataset fashion-mnist \\
      --checkpoint checkpoints/resnet18_16_fmnist.safetensors --param asn:m_f=0.1 --images 256

Image-steps per second = images x T / wall time of the simulation (data already in memory,
calibration and conversion not timed; on CUDA after an untimed warm-up run, so Triton's
one-time kernel compilation, about a second per process, is left out). Rate codes run T steps;
a time code (TTFS) runs to its answer step, which its row states. ``--param neuron:KEY=VALUE``
fixes a neuron's option at calibrate (``--param asn:m_f=0.1`` skips ASN's operating-point
choice, which on a deep network takes longer than the timing). ``--compile`` adds IF, ASN and
VSN rows with their steps through torch.compile, timed after an untimed warm-up (its seconds,
compilation included, are in the JSON). ``--repeat N``: the median of N timed runs per row. The
ANN runs as the checkpoint's layout gives it and channels last (the simulation's layout on the
CPU), so neither baseline hides the layout's gain. Peak memory: CUDA allocator peak
on a GPU; on the CPU the growth of the process's resident set (ru_maxrss) during the run, a
coarse figure that only rises.
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
from peers import for_spikingjelly
from ann2snn.store.artifact import load_artifact
from ann2snn.app.cli import key_values
from ann2snn.io.data import open_dataset
from ann2snn.sim.energy import fanout_maps
from ann2snn.io.files import write_text
from ann2snn.options import CalibrationOptions, DataSource
from ann2snn.neurons import compiled
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


def ours(artifact: Path, data, T: int | None, batch: int, device: torch.device, engine: str,
         compile_steps: bool = False) -> tuple[float, float, float]:
    """Accuracy, seconds and peak memory of the artifact's SNN over ``T`` steps (None: its
    answer step), read out as its neuron reads (a time code holds its output); with
    ``compile_steps`` its layers built to run their steps through torch.compile."""
    compiled.enable(compile_steps)
    art = load_artifact(artifact)
    compiled.enable(False)
    T = T or pipeline.answer_step(artifact)
    layers = art.meta.layer_names
    fan = fanout_maps(art.ann, tuple(art.meta.input.shape))
    readout = art.neuron.readout_for(art.meta.neuron.options, T, None)
    sim, seconds, peak = _timed(device, lambda: simulate(art.snn, layers, fan, data, T, batch, device, readout,
                                                         engine=engine))
    return float(sim.metric[-1]) / len(data), seconds, peak


def ann_passes(artifact: Path, data, T: int, batch: int, device: torch.device,
               channels_last: bool = False) -> tuple[float, float, float]:
    ann = load_artifact(artifact).ann.to(device).eval()

    def run():
        with torch.inference_mode():
            for x, _ in data.batches(batch):
                x = x.to(device)
                if channels_last and x.dim() == 4:  # the layout the simulation gives its images on the CPU
                    x = x.contiguous(memory_format=torch.channels_last)
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


NEURONS = ("if", "asn", "vsn", "ttfs")


def neuron_params(items: list[str], neurons: list[str]) -> dict[str, list[str]]:
    """``--param neuron:KEY=VALUE`` items, by neuron type."""
    out: dict[str, list[str]] = {n: [] for n in neurons}
    for item in items:
        name, sep, kv = item.partition(":")
        if not sep or name not in out or "=" not in kv:
            raise SystemExit(f"--param {item!r}: expected NEURON:KEY=VALUE with NEURON one of {', '.join(neurons)}")
        out[name].append(kv)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--checkpoint", type=Path, default=Path("checkpoints/lenet5_mnist.safetensors"))
    p.add_argument("--neurons", default=",".join(NEURONS), help="comma-separated neuron types to time")
    p.add_argument("--param", action="append", default=[], metavar="NEURON:KEY=VALUE",
                   help="a neuron option for calibrate, e.g. asn:m_f=0.1 (repeatable)")
    p.add_argument("--samples", type=int, default=1000, help="calibration images")
    p.add_argument("--engines", default="layers", help="layers, steps or both (comma-separated)")
    p.add_argument("--compile", action="store_true", help="also time ASN and VSN with --compile (torch.compile); "
                                                          "the untimed warm-up that compiles is reported")
    p.add_argument("--timesteps", type=int, default=64, help="steps of the rate codes (a time code runs to its answer)")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeat", type=int, default=1, help="timed runs of each row; the median is reported "
                                                          "(shared machines vary by tens of percent from run to run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip", default="", help="comma-separated rows to leave out, e.g. 'SpikingJelly'")
    p.add_argument("--out", type=Path, default=Path("runs/bench_sim"))
    args = p.parse_args()
    device = resolve_device(args.device)
    user = key_values(args.model_arg, "--model-arg")
    chosen = [n.strip() for n in args.neurons.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in NEURONS]
    if unknown:
        raise SystemExit(f"--neurons: {', '.join(unknown)} not among {', '.join(NEURONS)}")
    params = neuron_params(args.param, chosen)
    T, B = args.timesteps, args.batch_size
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for neuron in chosen:
            profile = Path(tmp) / f"{neuron}.json"
            pipeline.calibrate(args.checkpoint, args.model, args.dataset, profile, neuron=neuron, device=str(device),
                               source=DataSource(args.data_dir), model_args=user,
                               neuron_options=key_values(params[neuron], "--param"),
                               options=CalibrationOptions(samples=args.samples))
            artifacts[neuron] = Path(tmp) / f"{neuron}.snn.safetensors"
            pipeline.convert(args.checkpoint, profile, artifacts[neuron])
        first = artifacts[chosen[0]]
        norm = load_artifact(first).meta.input.normalize
        data = open_dataset(args.dataset, "test", args.data_dir, False, norm).head(args.images)
        calib = open_dataset(args.dataset, "train", args.data_dir, False, norm).head(1024)
        runs = [("ANN x T forward passes", T, lambda d: ann_passes(first, d, T, B, device)),
                ("ANN x T forward passes, channels last", T, lambda d: ann_passes(first, d, T, B, device, True))]
        for neuron in chosen:
            steps = pipeline.answer_step(artifacts[neuron]) or T
            for engine in [e.strip() for e in args.engines.split(",") if e.strip()]:
                runs.append((f"ann2snn {neuron.upper()} {engine}", steps,
                             lambda d, n=neuron, e=engine, k=steps: ours(artifacts[n], d, k, B, device, e)))
                if args.compile and neuron in ("if", "asn", "vsn"):  # TTFS's scan has no step to compile
                    runs.append((f"ann2snn {neuron.upper()} {engine} --compile", steps,
                                 lambda d, n=neuron, e=engine, k=steps: ours(artifacts[n], d, k, B, device, e, True)))
        model = for_spikingjelly(load_artifact(first).ann)  # the checkpoint's function, its ReLUs plain
        runs.append(("SpikingJelly IF (RateCodingRecipe 99.9%)", T,
                     lambda d: spikingjelly(model, calib, d, T, B, device)))
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        for name, steps, run in runs:
            if any(s in name for s in skip):
                continue
            warm_up = None
            if device.type == "cuda" or "--compile" in name:  # untimed warm-up: compiling happens once a process
                start = time.perf_counter()
                run(data.head(min(len(data), B)))
                run(data.head(len(data) % B or B))  # the last batch's size may compile its own variant
                warm_up = round(time.perf_counter() - start, 1)
            results = [run(data) for _ in range(args.repeat)]
            result = results[0] if isinstance(results[0], str) else sorted(results, key=lambda r: r[1])[len(results) // 2]
            if isinstance(result, str):
                rows.append({"run": name, "note": result})
                print(f"{name}: {result}", flush=True)
                continue
            acc, seconds, peak = result
            rows.append({"run": name, "timesteps": steps, "accuracy": acc, "seconds": round(seconds, 3),
                         "image_steps_per_second": round(len(data) * steps / seconds, 1),
                         "peak_memory_mb": round(peak / 2**20, 1), "warm_up_seconds": warm_up})
            print(f"{name}: {rows[-1]['image_steps_per_second']:,.0f} image-steps/s", flush=True)
    print_table(rows, f"{args.model} on {args.dataset}, {len(data)} images, rate codes T={T}, batch {B}, device "
                      f"{device} ({torch.get_num_threads()} CPU threads)")
    summary = {"model": args.model, "model_args": user, "dataset": args.dataset, "shape": list(data.sample_shape),
               "images": len(data), "timesteps": T, "repeat": args.repeat,
               "batch_size": B, "device": str(device), "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "params": params, "rows": rows}
    write_text(args.out / "bench_simulation.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out / 'bench_simulation.json'}")


def print_table(rows: list[dict], title: str) -> None:
    timed = [r for r in rows if "image_steps_per_second" in r]
    sj = next((r for r in timed if r["run"].startswith("SpikingJelly")), None)
    ann_row = next((r for r in timed if r["run"].startswith("ANN")), None)
    print(f"\n{title}")
    print("| run | steps | accuracy | image-steps/s | vs SpikingJelly | vs T ANN passes | peak memory MB |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "note" in r:
            print(f"| {r['run']} | | {r['note']} | | | | |")
            continue
        ratio_sj = f"{r['image_steps_per_second'] / sj['image_steps_per_second']:.2f}x" if sj else "-"
        ratio_ann = f"{r['image_steps_per_second'] / ann_row['image_steps_per_second']:.2f}x" if ann_row else "-"
        acc = "-" if r["accuracy"] != r["accuracy"] else f"{100 * r['accuracy']:.2f}%"
        print(f"| {r['run']} | {r['timesteps']} | {acc} | {r['image_steps_per_second']:,.0f} | {ratio_sj} | "
              f"{ratio_ann} | {r['peak_memory_mb']:,.1f} |")


if __name__ == "__main__":
    main()

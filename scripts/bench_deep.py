#!/usr/bin/env python3
"""Deep networks: every code on one checkpoint in one run, beside SpikingJelly's converter.

On one checkpoint and the same test images: the ANN; SpikingJelly's ``ann2snn`` converter
(``RateCodingRecipe``, 99.9% mode, the same calibration images) where it is installed
(``pip install -e '.[bench]'``); ann2snn IF with every default (layer calibration on) and without
layer calibration, burst IF (``max_spikes=2``), VSN at T = 1, TTFS (its levels chosen by calibrate,
simulated to its answer step), and ASN with ``--asn``. For each:
accuracy per step (Wilson 95% interval at the last step), the first step from which it stays
within 0.3 / 1 point of the ANN and the spikes, synaptic operations and energy spent by then;
wall time. One JSON file, one plot, and a Markdown table (the README's deep table); each row is
also written to ``partial.json`` as it ends.

  python scripts/bench_deep.py --model vgg16_bn --model-arg width=16 --dataset fashion-mnist \\
      --checkpoint scripts/reference/vgg16_bn16_fmnist.safetensors --out runs/bench_deep_vgg

Every setting here is a default chosen on the ``val`` split (docs/results.md); calibration
images come from ``--calibration-split`` (``fit`` for a checkpoint trained with ``--holdout``),
figures from ``--split`` (test).
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ann2snn.app import pipeline
from ann2snn.app.cli import key_values
from ann2snn.evaluation.report import plot, within_margin
from ann2snn.evaluation.stats import wilson
from ann2snn.io.data import open_dataset
from ann2snn.io.files import write_text
from ann2snn.options import CalibrationOptions, DataSource, RunOptions
from ann2snn.sim.simulate import resolve_device
from ann2snn.store.artifact import load_artifact
from peers import for_spikingjelly

MARGINS = (0.3, 1.0)


def ours(a, tmp: Path, label: str, neuron: str, timesteps: int | None, params: dict | None = None,
         layer_calibration: int | None = None) -> dict:
    """calibrate, convert and evaluate one ann2snn setting; the report's figures. ``timesteps``
    None: a time code's answer step."""
    start = time.perf_counter()
    profile, artifact = tmp / f"{label}.json", tmp / f"{label}.snn.safetensors"
    options = CalibrationOptions(split=a.calibration_split, layer_calibration=layer_calibration)
    pipeline.calibrate(a.checkpoint, a.model, a.dataset, profile, neuron=neuron, neuron_options=params,
                       options=options, source=DataSource(a.data_dir), device=a.device, model_args=a.model_args)
    calibrated = time.perf_counter() - start
    pipeline.convert(a.checkpoint, profile, artifact, model_ref=a.model)
    timesteps = timesteps or pipeline.answer_step(artifact, a.model)
    report = pipeline.evaluate(artifact, a.dataset, RunOptions(timesteps=timesteps, split=a.split, limit=a.limit,
                                                               batch_size=a.batch_size),
                               source=DataSource(a.data_dir), device=a.device, model_ref=a.model).to_json()
    curve = [{k: c[k] for k in ("timestep", "accuracy", "spikes_per_sample", "synops_per_sample",
                                "energy_pj_per_sample")} for c in report["curve"]]
    snn = report["snn"]
    if snn.get("answer_step"):
        label = f"{label} ({neuron} {' '.join(f'{k}={v}' for k, v in report['neuron_options'].items() if k == 'levels')})"
    return {"method": "ann2snn", "setting": label, "ann_accuracy": report["ann"]["accuracy"],
            "answer_step": snn.get("answer_step"), "neurons": snn["neurons"],
            "energy_event_driven_pj": snn.get("energy_event_driven_pj_per_sample"),
            "ann_energy_pj": report["ann"].get("energy_pj_per_sample"), "samples": report["dataset"]["samples"],
            "accuracy": report["snn"]["accuracy"], "ci95": report["snn"]["accuracy_ci95"], "curve": curve,
            "calibrate_s": calibrated, "seconds": time.perf_counter() - start}


def spikingjelly(a, timesteps: int) -> dict | str:
    """SpikingJelly's converter on the same checkpoint, calibration and test images: accuracy and
    spikes after every step (spikes counted at its IF nodes)."""
    try:
        from spikingjelly.activation_based import functional, neuron
        from spikingjelly.activation_based.ann2snn import Converter, RateCodingRecipe
    except ImportError as exc:
        return f"not importable ({exc}; pip install -e '.[bench]')"
    start = time.perf_counter()
    device = resolve_device(a.device)
    art = load_artifact(a.reference_artifact)
    norm = art.meta.input.normalize
    model = for_spikingjelly(art.ann).to(device)  # the checkpoint's function (batch norm folded), plain ReLUs
    calib = open_dataset(a.dataset, a.calibration_split, a.data_dir, False, norm).head(a.sj_calibration)
    test = open_dataset(a.dataset, a.split, a.data_dir, False, norm)
    test = test.head(a.limit) if a.limit else test
    loader = [x for x, _ in calib.batches(a.batch_size)]
    snn = Converter(RateCodingRecipe(loader, mode="99.9%"), device=device).convert(model)
    counted = [0.0]
    nodes = [m for m in snn.modules() if isinstance(m, neuron.IFNode)]
    for m in nodes:
        m.register_forward_hook(lambda mod, args, out: counted.__setitem__(0, counted[0] + float(out.sum())))
    correct, spikes = torch.zeros(timesteps, dtype=torch.float64), torch.zeros(timesteps, dtype=torch.float64)
    with torch.inference_mode():
        for x, y in test.batches(a.batch_size):
            x, y = x.to(device), y.to(device)
            functional.reset_net(snn)
            total = 0
            for t in range(timesteps):
                counted[0] = 0.0
                total = total + snn(x)
                correct[t] += float((total.argmax(1) == y).sum())
                spikes[t] += counted[0]
    n = len(test)
    spent = torch.cumsum(spikes, 0) / n
    curve = [{"timestep": t + 1, "accuracy": float(correct[t]) / n, "spikes_per_sample": float(spent[t])}
             for t in range(timesteps)]
    return {"method": "SpikingJelly", "setting": "IF, RateCodingRecipe 99.9%", "accuracy": curve[-1]["accuracy"],
            "ci95": list(wilson(int(correct[-1]), n)), "curve": curve, "seconds": time.perf_counter() - start,
            "samples": n}


def finish_row(row: dict, ann: float) -> dict:
    for m in MARGINS:
        row[f"within_{m}"] = within_margin(row["curve"], ann, m)
        settled = row[f"within_{m}"]["settled"]
        row[f"within_{m}"]["settled_synops"] = row["curve"][settled - 1].get("synops_per_sample") if settled else None
    return row


def show(rows: list[dict], ann: float, title: str) -> str:
    """The rich table on the console; returns the same as Markdown."""
    head = ["method", "setting", "T", "accuracy (95% CI)", "vs ANN", "stays within 0.3 from (spikes)",
            "stays within 1 from (spikes)", "spikes/sample at T", "spikes/neuron", "event-driven uJ", "wall s"]
    table = Table(title=title)
    for h in head:
        table.add_column(h)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        def at(m):
            w = r[f"within_{m}"]
            return f"step {w['settled']} ({w['settled_spikes']:,.0f})" if w["settled"] else "not within"
        lo, hi = r["ci95"]
        cells = [r["method"], r["setting"], str(len(r["curve"])),
                 f"{100 * r['accuracy']:.2f}% ({100 * lo:.2f}-{100 * hi:.2f})",
                 f"{100 * (r['accuracy'] - ann):+.2f}", at(0.3), at(1.0),
                 f"{r['curve'][-1]['spikes_per_sample']:,.0f}",
                 f"{r['curve'][-1]['spikes_per_sample'] / r['neurons']:.3g}" if r.get("neurons") else "-",
                 f"{r['energy_event_driven_pj'] / 1e6:.3g}" if r.get("energy_event_driven_pj") else "-",
                 f"{r['seconds']:.0f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=220).print(table)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--timesteps", "-T", type=int, default=64, help="steps of the rate codes and SpikingJelly")
    p.add_argument("--asn", action="store_true", help="add ASN (its operating-point choice is slow at depth)")
    p.add_argument("--asn-timesteps", type=int, default=200)
    p.add_argument("--quick", action="store_true", help="IF, VSN and TTFS only (no SpikingJelly, no IF variants)")
    p.add_argument("--split", default="test")
    p.add_argument("--calibration-split", default="fit")
    p.add_argument("--sj-calibration", type=int, default=2000, help="calibration images given to SpikingJelly "
                                                                    "(ann2snn calibrate's default count)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench_deep"))
    a = p.parse_args()
    a.model_args = key_values(a.model_arg, "--model-arg")
    a.out.mkdir(parents=True, exist_ok=True)
    T = a.timesteps
    rows = []

    def keep(row: dict) -> None:  # each row as it ends, so that a stopped run keeps what it measured
        rows.append(row)
        write_text(a.out / "partial.json", json.dumps(rows, indent=1) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keep(ours(a, tmp, "IF, every default", "if", T))
        a.reference_artifact = tmp / "IF, every default.snn.safetensors"
        if not a.quick:
            keep(ours(a, tmp, "IF, no layer calibration", "if", T, layer_calibration=0))
            keep(ours(a, tmp, "burst IF (max_spikes=2)", "if", T, {"max_spikes": 2}))
        keep(ours(a, tmp, "VSN, T = 1", "vsn", 1))
        if a.asn:
            keep(ours(a, tmp, "ASN, every default", "asn", a.asn_timesteps))
        keep(ours(a, tmp, "TTFS, every default", "ttfs", None))
        sj = spikingjelly(a, T) if not a.quick else "left out (--quick)"
    ann = rows[0]["ann_accuracy"]
    if isinstance(sj, str):
        print(f"SpikingJelly: {sj}")
    else:
        rows.insert(0, sj)
    rows = [finish_row(r, ann) for r in rows]
    n = rows[-1]["samples"]
    title = (f"{a.model} {' '.join(a.model_arg)} on {a.dataset} {a.split} ({n} images): ANN {100 * ann:.2f}% "
             f"({' - '.join(f'{100 * v:.2f}' for v in wilson(round(ann * n), n))})")
    markdown = show(rows, ann, title)
    write_text(a.out / "table.md", f"{title}\n\n{markdown}")
    write_text(a.out / "bench_deep.json", json.dumps({"model": a.model, "model_args": a.model_args,
                                                      "dataset": a.dataset, "split": a.split,
                                                      "checkpoint": str(a.checkpoint), "ann_accuracy": ann,
                                                      "samples": n, "rows": rows}, indent=1) + "\n")
    plot([(f"{r['method']}: {r['setting']}", r["curve"]) for r in rows if len(r["curve"]) > 1 and
          all(math.isfinite(c["spikes_per_sample"]) for c in r["curve"])], ann,
         a.out / "accuracy_vs_spikes.png", title)
    print(f"wrote {a.out}/bench_deep.json, table.md, accuracy_vs_spikes.png")


if __name__ == "__main__":
    main()

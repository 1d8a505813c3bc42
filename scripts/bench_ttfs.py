#!/usr/bin/env python3
"""TTFS on one checkpoint: every resolution K by forward passes on the whole test split, the
K that ``calibrate`` chooses, and the simulated SNN on a subset checked against them.

At its answer step a TTFS network's output is its transfer network's, bit for bit
(``tests/test_ttfs.py``), and every unit coding a value above zero spikes once. So the accuracy
and spikes of every K on all test images cost one forward pass each. The SNN itself is
simulated to its answer step on the first ``--simulate`` test images, and its answers and spikes
are compared with the forward pass's on the same images. The script prints a table and writes
JSON.

  python scripts/bench_ttfs.py --model vgg16_bn --model-arg width=16 --dataset fashion-mnist \\
      --checkpoint scripts/reference/vgg16_bn16_fmnist.safetensors --out runs/bench_ttfs_vgg

The calibration images come from ``--calibration-split`` (``fit`` for a ``--holdout`` checkpoint;
``calibrate``'s default count, seed 0, as it draws them). The figures come from ``--split``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ann2snn import neurons
from ann2snn.app.cli import key_values
from ann2snn.conversion.graph import normalize
from ann2snn.conversion.statistics import activation_stats
from ann2snn.evaluation.stats import wilson
from ann2snn.io.checkpoint import load_model
from ann2snn.io.data import calibration_subset, open_dataset
from ann2snn.io.files import write_text
from ann2snn.io.zoo import model_kwargs
from ann2snn.options import CalibrationOptions
from ann2snn.search import exact
from ann2snn.search.budget import ann_outputs, fitted_layers
from ann2snn.sim.network import Fanouts, build_network
from ann2snn.sim.simulate import resolve_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dataset", required=True)
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--calibration-split", default="fit")
    p.add_argument("--samples", type=int, default=CalibrationOptions().samples, help="calibration images "
                                                                                   "(calibrate's default)")
    p.add_argument("--budget-per-neuron", type=float, default=None,
                   help="choose for calibrate --budget of this many spikes per spiking neuron (levels and floor)")
    p.add_argument("--correction-samples", type=int, default=None,
                   help="images of the layer calibration under a budget (default: all the calibration images, "
                        "as calibrate; 0: none)")
    p.add_argument("--simulate", type=int, default=500, help="test images simulated to check the forward passes")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench_ttfs"))
    a = p.parse_args()
    dev = resolve_device(a.device)
    ttfs = neurons.get("ttfs")
    calib = open_dataset(a.dataset, a.calibration_split, a.data_dir)
    calib = calibration_subset(calib, a.samples, 0) if len(calib) > a.samples else calib
    test = open_dataset(a.dataset, a.split, a.data_dir, normalize=calib.normalize)
    kwargs = model_kwargs(a.model, test.sample_shape, test.num_classes, key_values(a.model_arg, "--model-arg"))
    model = load_model(a.model, kwargs, a.checkpoint).eval()
    gm, _ = normalize(model)
    options = ttfs.options({})
    stats = activation_stats(gm, calib, float(options["percentile"]), a.batch_size, str(dev))
    units = sum(s.neurons for s in stats.values())
    budget = a.budget_per_neuron * units if a.budget_per_neuron is not None else None
    start = time.perf_counter()
    chosen, record, layers, calibration = exact.choose(gm, stats, ttfs, options, calib, budget, a.batch_size, dev,
                                                       len(calib) if a.correction_samples is None else
                                                       a.correction_samples)
    choice_s = time.perf_counter() - start
    reference = ann_outputs(gm, test, a.batch_size, dev)
    ann = float((reference.argmax(1) == test.targets).double().mean())
    fan = Fanouts(gm, test.sample_shape)
    rows = []
    k, floor, lowest = chosen["levels"], chosen["floor"], record.chosen.get("layer_lowest")
    opts = {**options, "levels": k, "floor": floor}
    fixed = [({**options, "levels": v}, None, None) for v in ttfs.precision.values]
    if floor or lowest or calibration:
        fixed.append((opts, layers, calibration))
    for o, ls, cal in fixed:
        r = exact.measure(gm, ttfs, o, stats, test, reference, a.batch_size, dev, ls, cal)
        net = build_network(gm, ttfs, ls or fitted_layers(stats, ttfs, o), o, 1, fan)
        rows.append({"levels": o["levels"], "floor": o["floor"], "layer_lowest": lowest if ls else None,
                     "corrected": cal is not None, **r,
                     "ci95": wilson(round(r["accuracy"] * len(test)), len(test)),
                     "spikes_per_neuron": r["spikes_per_sample"] / units, "answer_step": net.answer_step})
    net = build_network(gm, ttfs, layers, opts, 1, fan, calibration=calibration)
    head = test.head(a.simulate)
    start = time.perf_counter()
    sim = net.simulate(head, net.answer_step, a.batch_size, dev, label="TTFS")
    sim_s = time.perf_counter() - start
    forward = exact.measure(gm, ttfs, opts, stats, head, ann_outputs(gm, head, a.batch_size, dev), a.batch_size, dev,
                            layers, calibration)
    check = {"images": len(head), "levels": k, "floor": floor, "answer_step": net.answer_step,
             "simulated_accuracy": float(sim.metric[-1]) / len(head), "forward_accuracy": forward["accuracy"],
             "simulated_spikes_per_sample": float(sim.spikes.sum()) / len(head),
             "forward_spikes_per_sample": forward["spikes_per_sample"], "seconds": sim_s}
    title = (f"TTFS, {a.model} {' '.join(a.model_arg)} on {a.dataset} {a.split} ({len(test)} images): "
             f"ANN {100 * ann:.2f}%; {units:,} spiking neurons; calibrate chose levels={k}"
             + (f" floor={floor:g}" if floor else "")
             + (f" lowest level per layer {','.join(map(str, lowest))}" if lowest else "")
             + (", layer calibration (forward pass)" if calibration else "")
             + (f" for {budget:,.0f} spikes per sample ({a.budget_per_neuron:g} per neuron)" if budget else "")
             + f" in {choice_s:.1f} s")
    table = Table(title=title)
    for h in ("levels", "answer step", "accuracy (95% CI)", "vs ANN", "differs from ANN", "spikes/sample",
              "spikes/neuron"):
        table.add_column(h, justify="right")
    lines = ["| levels | answer step | accuracy (95% CI) | vs ANN | differs from ANN | spikes/sample | spikes/neuron |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (chosen)" if (r["levels"], r["floor"], r["layer_lowest"], r["corrected"]) == \
            (k, floor, lowest, calibration is not None) else ""
        dead = (f", floor {r['floor']:g}" if r["floor"] else "") + \
            (f", lowest {','.join(map(str, r['layer_lowest']))}" if r["layer_lowest"] else "") + \
            (", corrected" if r["corrected"] else "")
        cells = [f"{r['levels']}{dead}{mark}",
                 str(r["answer_step"]),
                 f"{100 * r['accuracy']:.2f}% ({100 * r['ci95'][0]:.2f}-{100 * r['ci95'][1]:.2f})",
                 f"{100 * (r['accuracy'] - ann):+.2f}", f"{100 * r['disagreement']:.2f}%",
                 f"{r['spikes_per_sample']:,.0f}", f"{r['spikes_per_neuron']:.3f}"]
        table.add_row(*cells)
        lines.append("| " + " | ".join(cells) + " |")
    Console(width=200).print(table)
    same = "the same" if check["simulated_accuracy"] == check["forward_accuracy"] and \
        check["simulated_spikes_per_sample"] == check["forward_spikes_per_sample"] else "NOT the same"
    summary = (f"simulated to step {check['answer_step']} on the first {len(head)} images ({sim_s:.0f} s): "
               f"{100 * check['simulated_accuracy']:.2f}%, {check['simulated_spikes_per_sample']:,.1f} spikes per "
               f"sample; the forward pass: {100 * check['forward_accuracy']:.2f}%, "
               f"{check['forward_spikes_per_sample']:,.1f}: {same}")
    print(summary)
    a.out.mkdir(parents=True, exist_ok=True)
    write_text(a.out / "table.md", f"{title}\n\n" + "\n".join(lines) + f"\n\n{summary}\n")
    write_text(a.out / "bench_ttfs.json", json.dumps({
        "model": a.model, "model_args": a.model_arg, "dataset": a.dataset, "split": a.split,
        "checkpoint": str(a.checkpoint), "ann_accuracy": ann, "neurons": units, "samples": len(test),
        "choice": {"levels": k, "floor": floor, "layer_lowest": lowest, "corrected": calibration is not None, "seconds": choice_s, "bar": record.bar, "budget": budget,
                   "candidates": record.candidates},
        "rows": rows, "simulated_check": check}, indent=1) + "\n")
    print(f"wrote {a.out}/bench_ttfs.json, table.md")


if __name__ == "__main__":
    main()

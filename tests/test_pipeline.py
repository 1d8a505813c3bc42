"""One pipeline under every front end: the file-based steps, the Python API and the CLI share
the in-memory core, its defaults (the options dataclasses') and the registries' names."""

import dataclasses
import inspect
import json

import torch
from typer.main import get_command

import ann2snn
from ann2snn import neurons
from ann2snn.app import cli, pipeline
from ann2snn.io.data import Normalize, open_dataset
from ann2snn.io.zoo import list_models
from ann2snn.neurons import if_neuron
from ann2snn.options import CalibrationOptions, DataSource, FinetuneOptions, RunOptions, default_of
from ann2snn.store.artifact import read_artifact
from conftest import tiny_cnn


def _toy(percentile: float):
    """IF under another name, with its own default percentile."""
    return dataclasses.replace(if_neuron.NEURON, name="toy",
                               defaults={**if_neuron.NEURON.defaults, "percentile": percentile})


def test_a_neurons_own_percentile_stands_when_the_user_gives_none(run_cli, tiny_files, monkeypatch):
    monkeypatch.setitem(neurons.NEURONS, "toy", _toy(97.0))
    f, d = tiny_files, tiny_files["dir"]
    args = ("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "--samples", 40,
            "--neuron", "toy")
    code, out, err = run_cli(*args, "-o", d / "own.json")
    assert code == 0, err
    assert "p97" in out and "p99.9" not in out
    own = json.loads((d / "own.json").read_text())
    assert own["neuron"]["options"]["percentile"] == 97.0
    assert run_cli(*args, "-o", d / "named.json", "--percentile", 97)[0] == 0
    assert json.loads((d / "named.json").read_text())["layers"] == own["layers"]  # the same statistics
    assert run_cli(*args, "-o", d / "other.json", "--percentile", 99.9)[0] == 0
    other = json.loads((d / "other.json").read_text())
    assert other["neuron"]["options"]["percentile"] == 99.9 and other["layers"] != own["layers"]
    assert run_cli(*args, "-o", d / "param.json", "--param", "percentile=99.9")[0] == 0  # --param still sets it
    assert json.loads((d / "param.json").read_text())["layers"] == other["layers"]
    model = tiny_cnn()
    x = torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    profile = ann2snn.calibrate(model, (x, model(x).argmax(1).detach()), neuron="toy", device="cpu")
    assert profile.neuron.options["percentile"] == 97.0


def test_the_file_steps_are_the_in_memory_core_on_loaded_files(tiny_files):
    f, d = tiny_files, tiny_files["dir"]
    options = CalibrationOptions(samples=40)
    on_files, rows = pipeline.calibrate(f["checkpoint"], "conftest:tiny_cnn", str(f["data"]), d / "p.json",
                                        options=options, device="cpu")
    data = open_dataset(str(f["data"]), "train", None, False, Normalize(), False)
    request = pipeline.calibration_request("if", None, None, options)
    in_memory, same_rows = pipeline.calibrate_model(tiny_cnn(), data, request, device="cpu")
    assert rows == same_rows and on_files.layers == in_memory.layers and on_files.input == in_memory.input
    assert on_files.model.weights_sha256 == in_memory.model.weights_sha256
    assert (on_files.data.dataset, in_memory.data.dataset) == (str(f["data"]), pipeline.IN_MEMORY)
    meta, _ = pipeline.convert(f["checkpoint"], d / "p.json", d / "s.snn.safetensors", model_ref="conftest:tiny_cnn")
    assert read_artifact(d / "s.snn.safetensors")[0] == meta
    snn = ann2snn.convert(tiny_cnn(), on_files)
    assert snn.meta == pipeline.artifact_meta(on_files, snn.ann, "gated") == meta


def _defaults(command: str) -> dict:
    return {p.name: p.default for p in get_command(cli.app).commands[command].params}


def test_front_end_defaults_are_the_options_dataclasses():
    source = {name: default_of(DataSource, name) for name in ("data_dir", "download", "skip_bad_images")}
    calibrate, evaluate, finetune = (_defaults(c) for c in ("calibrate", "evaluate", "finetune"))
    for field in ("samples", "seed", "split", "batch_size", "budget", "timesteps", "search_samples"):
        assert calibrate[field] == default_of(CalibrationOptions, field), field
    for flag, field in (("split", "split"), ("limit", "limit"), ("batch_size", "batch_size"), ("energy", "preset"),
                        ("start_ms", "start_ms")):
        assert evaluate[flag] == default_of(RunOptions, field), flag
    for field in ("epochs", "split", "lr", "batch_size", "seed", "spike_penalty", "threshold_lr"):
        assert finetune[field] == default_of(FinetuneOptions, field), field
    for command in (calibrate, evaluate, finetune):
        assert {k: command[k] for k in source} == source
    assert calibrate["percentile"] is None  # unset: the neuron's own
    assert _defaults("convert")["maxpool"] == pipeline.DEFAULT_MAXPOOL
    calibrate_api, evaluate_api = (inspect.signature(fn).parameters for fn in (ann2snn.calibrate, ann2snn.evaluate))
    for field in ("samples", "seed", "batch_size", "budget", "timesteps", "search_samples"):
        assert calibrate_api[field].default == default_of(CalibrationOptions, field), field
    for field in ("preset", "start_ms", "batch_size"):
        assert evaluate_api[field].default == default_of(RunOptions, field), field


def test_help_lists_the_registered_neurons_and_zoo_models():
    helps = {c: {p.name: p.help for p in get_command(cli.app).commands[c].params} for c in ("calibrate", "evaluate")}
    assert all(name in helps["calibrate"]["model"] for name in list_models())
    for text in (helps["calibrate"]["neuron"], helps["evaluate"]["compare"]):
        assert all(name in text for name in neurons.NEURONS)
    assert all(f"{n.label} {n.default_timesteps}" in helps["calibrate"]["timesteps"]
               for n in neurons.NEURONS.values() if n.precision is not None)


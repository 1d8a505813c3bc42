"""Layer calibration (bias correction layer after layer, conversion/layer_calibration.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from ann2snn import neurons
from ann2snn.conversion import layer_calibration
from ann2snn.conversion.graph import normalize, spiking_layers, to_snn
from ann2snn.io.data import TensorData
from ann2snn.io.zoo import resolve_model
from ann2snn.options import CalibrationOptions
from ann2snn.store.artifact import build_neurons

CPU = torch.device("cpu")


def deep_net(name: str = "vgg16_bn"):
    """A small random deep zoo net (width 8) with batch-norm statistics that are not the identity."""
    torch.manual_seed(0)
    net = resolve_model(name, {"width": 8, "num_classes": 4}).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return net


def images(n: int = 24, seed: int = 2) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def if_snn(gm, x):
    """IF thresholds at the 99.9th percentile of the calibration images, as calibrate fits them."""
    from ann2snn.conversion.statistics import activation_stats
    from ann2snn.store.profile import make_layers

    neuron = neurons.get("if")
    stats = activation_stats(gm, TensorData("t", "train", x, torch.zeros(len(x), dtype=torch.long), 4),
                             99.9, 64, "cpu")
    layers = make_layers(gm, stats, neuron, neuron.options({}))
    return neuron, layers, to_snn(gm, build_neurons(neuron, layers))


@pytest.mark.parametrize("model", ["vgg16_bn", "resnet18"])
def test_each_corrected_layer_is_closer_to_the_ann(model):
    gm, _ = normalize(deep_net(model))
    x = images()
    neuron, layers, snn = if_snn(gm, x)
    names = spiking_layers(gm)
    record = layer_calibration.fit(gm, snn, names, x, 8, CPU)
    assert record.corrections and record.timesteps == 8 and record.samples == len(x)
    corrected = to_snn(gm, build_neurons(neuron, layers), calibration=record)
    for c in record.corrections:
        # the layer's own error, measured with every correction below it in place (as it was fitted)
        below = layer_calibration.LayerCalibrationRecord(
            timesteps=8, samples=len(x), rounds=1,
            corrections=[d for d in record.corrections if names.index(d.layer) < names.index(c.layer)])
        uncorrected = layer_calibration.layer_error(gm, to_snn(gm, build_neurons(neuron, layers), calibration=below),
                                                    c.layer, x, 8)
        assert uncorrected == pytest.approx(c.error_before, rel=1e-4, abs=1e-7)
        assert layer_calibration.layer_error(gm, corrected, c.layer, x, 8) < c.error_before


def test_fit_is_deterministic():
    gm, _ = normalize(deep_net())
    x = images()
    _, _, snn = if_snn(gm, x)
    a = layer_calibration.fit(gm, snn, spiking_layers(gm), x, 6, CPU)
    _, _, snn = if_snn(gm, x)
    b = layer_calibration.fit(gm, snn, spiking_layers(gm), x, 6, CPU)
    assert [(c.layer, c.shift) for c in a.corrections] == [(c.layer, c.shift) for c in b.corrections]


def test_a_layer_that_already_equals_the_ann_is_not_moved():
    """VSN at T = 1 with zero thresholds computes the ANN exactly: nothing to correct."""
    gm, _ = normalize(deep_net("resnet18"))
    x = images()
    vsn = neurons.get("vsn")
    from ann2snn.conversion.statistics import activation_stats
    from ann2snn.store.profile import make_layers

    stats = activation_stats(gm, TensorData("t", "train", x, torch.zeros(len(x), dtype=torch.long), 4),
                             99.9, 64, "cpu")
    layers = make_layers(gm, stats, vsn, vsn.options({}))
    record = layer_calibration.fit(gm, to_snn(gm, build_neurons(vsn, layers)), spiking_layers(gm), x, 1, CPU)
    assert record.corrections == []


def test_option_is_checked():
    with pytest.raises(Exception, match="layer_calibration"):
        CalibrationOptions(layer_calibration=-1)
    assert neurons.get("if").layer_calibration > 0 and neurons.get("vsn").layer_calibration == 0


def test_cli_layer_calibration_end_to_end(run_cli, tmp_path):
    """calibrate fits it by default for IF (and not with --layer-calibration 0), convert keeps it in
    the artifact, evaluate runs with it; a profile naming a layer that is not spiking is refused."""
    net = deep_net()
    x = images()
    with torch.no_grad():
        y = net(x).argmax(1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    save_file({"inputs": x, "targets": y}, str(tmp_path / "d.safetensors"))
    common = ["-m", "vgg16_bn", "--model-arg", "width=8", "--model-arg", "num_classes=4"]
    code, out, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                             "--layer-calibration", "8", "-o", tmp_path / "if.json")
    assert code == 0, err
    assert "layer calibration at 8 steps" in out
    profile = json.loads((tmp_path / "if.json").read_text())
    assert profile["layer_calibration"]["timesteps"] == 8 and profile["layer_calibration"]["corrections"]
    assert run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / "if.json", "-o", tmp_path / "if.snn")[0] == 0
    code, _, err = run_cli("evaluate", tmp_path / "if.snn", "-d", tmp_path / "d.safetensors", "-T", 8,
                           "-r", tmp_path / "rep", "--device", "cpu")
    assert code == 0, err
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--layer-calibration", "0", "-o", tmp_path / "off.json")
    assert code == 0, err
    assert "layer_calibration" not in json.loads((tmp_path / "off.json").read_text())
    profile["layer_calibration"]["corrections"][0]["layer"] = "features_0"
    (tmp_path / "bad.json").write_text(json.dumps(profile))
    code, _, err = run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / "bad.json", "-o", tmp_path / "b.snn")
    assert code != 0 and "features_0" in err and "not a spiking layer" in err and "Traceback" not in err
    profile["layer_calibration"]["corrections"][0]["layer"] = "act1"
    profile["layer_calibration"]["corrections"][0]["shift"] = [0.0]
    (tmp_path / "bad.json").write_text(json.dumps(profile))
    code, _, err = run_cli("convert", tmp_path / "w.safetensors", "-c", tmp_path / "bad.json", "-o", tmp_path / "b.snn")
    assert code != 0 and "act1" in err and "1 values" in err
    code, _, err = run_cli("calibrate", tmp_path / "w.safetensors", *common, "-d", tmp_path / "d.safetensors",
                           "--layer-calibration", "-3", "-o", tmp_path / "neg.json")
    assert code != 0 and "layer" in err and not (tmp_path / "neg.json").exists()

"""The Python API runs the CLI's steps on in-memory objects and gives the CLI's answers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ann2snn
from conftest import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def _data(n=60):
    model = tiny_cnn()
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_api_matches_the_cli_on_the_same_model_and_data(run_cli, tiny_files, tmp_path):
    model, x, y = _data()
    profile = ann2snn.calibrate(model, (x, y), neuron="if", samples=40, device="cpu")
    snn = ann2snn.convert(model, profile)
    report = ann2snn.evaluate(snn, (x, y), timesteps=24, device="cpu")
    d = tiny_files["dir"]
    assert run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                   "--samples", 40, "-o", d / "p.json")[0] == 0
    assert run_cli("convert", "--trust-code", tiny_files["checkpoint"], "-c", d / "p.json", "-o", d / "s.safetensors")[0] == 0
    assert run_cli("evaluate", "--trust-code", d / "s.safetensors", "-d", tiny_files["data"], "-T", 24, "-r", d / "r",
                   "--device", "cpu")[0] == 0
    cli = json.loads((d / "r" / "report.json").read_text())
    assert [layer.params for layer in profile.layers] == \
        [layer["params"] for layer in json.loads((d / "p.json").read_text())["layers"]]
    assert report.accuracy == cli["snn"]["accuracy"] and report.spikes_per_sample == cli["snn"]["spikes_per_sample"]
    assert report.to_json()["curve"] == cli["curve"]


def test_a_spiking_network_steps_resets_saves_and_loads(tmp_path):
    model, x, y = _data()
    snn = ann2snn.convert(model, ann2snn.calibrate(model, torch.utils.data.TensorDataset(x, y), samples=40,
                                                   device="cpu"))
    first = snn.run(x[:4], 12)
    assert first.shape == (12, 4, 3)
    assert torch.equal(snn.run(x[:4], 12), first)  # run() resets: the same input gives the same outputs
    snn.reset()
    assert torch.equal(snn(x[:4]), first[0])
    path = tmp_path / "net.snn.safetensors"
    ann2snn.save(snn, path)
    again = ann2snn.load(path, tiny_cnn())
    assert torch.equal(again.run(x[:4], 12), first)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=7)
    a = ann2snn.evaluate(snn, loader, timesteps=10, device="cpu")
    b = ann2snn.evaluate(again, (x, y), timesteps=10, device="cpu")
    assert a.to_json()["curve"] == b.to_json()["curve"]


def test_api_refuses_what_it_cannot_use():
    model, x, y = _data()
    with pytest.raises(ann2snn.errors.OptionError, match="DataLoader, a Dataset or an"):
        ann2snn.calibrate(model, [1, 2, 3], device="cpu")
    with pytest.raises(ann2snn.errors.OptionError, match="60 inputs and 59 targets"):
        ann2snn.calibrate(model, (x, y[:-1]), device="cpu")
    profile = ann2snn.calibrate(model, (x, y), samples=40, device="cpu")
    other = tiny_cnn()
    with torch.no_grad():
        other.fc2.bias.add_(1.0)
    with pytest.raises(ann2snn.errors.UserError, match="made for other weights"):
        ann2snn.convert(other, profile)


def test_a_profile_from_the_cli_converts_the_same_weights_only(run_cli, tiny_files):
    from ann2snn.store.profile import load_profile

    d = tiny_files["dir"]
    assert run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                   "--samples", 40, "-o", d / "p.json")[0] == 0
    profile = load_profile(d / "p.json")
    snn = ann2snn.convert(tiny_cnn(), profile)  # the checkpoint was written from tiny_cnn()
    assert snn.meta.model.checkpoint == str(tiny_files["checkpoint"])
    other = tiny_cnn()
    with torch.no_grad():
        other.conv.weight.mul_(10)
    with pytest.raises(ann2snn.errors.UserError, match="made for other weights"):
        ann2snn.convert(other, profile)


def test_importing_ann2snn_and_writing_a_report_leave_matplotlib_alone(tmp_path):
    code = ("import matplotlib; matplotlib.use('svg'); import sys, torch, ann2snn\n"
            "from conftest import tiny_cnn\n"
            "m = tiny_cnn(); x = torch.rand(30, 1, 8, 8); y = m(x).argmax(1)\n"
            "s = ann2snn.convert(m, ann2snn.calibrate(m, (x, y), device='cpu'))\n"
            f"ann2snn.evaluate(s, (x, y), timesteps=5, device='cpu', report_dir={str(tmp_path / 'r')!r}, "
            "plot_format='pdf')\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT / "tests", capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "False"]
    assert (tmp_path / "r" / "accuracy_vs_spikes.pdf").read_bytes()[:5] == b"%PDF-"


def test_example_script_runs():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "example_api.py"), "--quick"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout

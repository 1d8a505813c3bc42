"""The contracts the package is built on: typed records read and written exactly, errors that
name the parameter, one neuron description object per type, reproducible files."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ann2snn import neurons
from ann2snn.errors import OptionError, UserError
from ann2snn.neurons import Neuron
from ann2snn.neurons import if_neuron
from ann2snn.options import CalibrationOptions, RunOptions
from ann2snn.store.profile import Profile, load_profile, save_profile
from ann2snn.neurons.readout import Readout
from ann2snn.io.records import from_json

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "calibration").glob("*.json"))


@pytest.mark.parametrize("path", PROFILES, ids=lambda p: p.name)
def test_committed_profiles_read_and_write_back_byte_for_byte(path, tmp_path):
    profile = load_profile(path)
    assert isinstance(profile, Profile) and profile.layers and profile.layers[0].params
    save_profile(profile, tmp_path / "again.json")
    assert (tmp_path / "again.json").read_bytes() == path.read_bytes()


def test_a_broken_profile_names_the_key_at_fault(tmp_path):
    raw = json.loads(PROFILES[0].read_text())
    del raw["layers"][1]["params"]
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"p.json: calibration profile: field 'layers\[1\].params' is missing"):
        load_profile(bad)
    raw = json.loads(PROFILES[0].read_text())
    raw["layers"][0]["neurons"] = "many"
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"field 'layers\[0\].neurons' must be int, not str"):
        load_profile(bad)
    raw["layers"][0]["neurons"] = True  # a bool is no count
    bad.write_text(json.dumps(raw))
    with pytest.raises(UserError, match=r"field 'layers\[0\].neurons' must be int, not bool"):
        load_profile(bad)


def test_records_build_only_declared_types():
    from ann2snn.neurons.arousal_policy import ArousalPolicy

    policy = from_json(ArousalPolicy, {"low": 0.3, "recheck": [60, 90], "layers": ["act1"]}, "f")
    assert policy.recheck == (60, 90) and policy.layers == ("act1",) and policy.high == 0.1
    with pytest.raises(UserError, match=r"f: field '\(top level\)': needs 0 < high"):
        from_json(ArousalPolicy, {"low": 5.0}, "f")
    with pytest.raises(UserError, match=r"field 'recheck\[1\]' must be int"):
        from_json(ArousalPolicy, {"recheck": [60, "os:system"]}, "f")


def test_library_errors_name_parameters_and_the_cli_names_flags(run_cli, tiny_files):
    with pytest.raises(OptionError) as err:
        RunOptions(timesteps=-3)
    assert err.value.option == "timesteps" and str(err.value) == "timesteps -3: must be positive"
    with pytest.raises(OptionError) as err:
        RunOptions(timesteps=10, preset="3nm")
    assert err.value.option == "preset" and "--" not in str(err.value)
    with pytest.raises(OptionError, match="^budget -1: must be a positive"):
        CalibrationOptions(budget=-1)
    code, _, stderr = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d",
                              tiny_files["data"], "-o", tiny_files["dir"] / "p.json", "--budget", "-1")
    assert code == 2 and "ann2snn: error: --budget -1: must be a positive" in stderr
    code, _, stderr = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d",
                              tiny_files["data"], "-o", tiny_files["dir"] / "p.json", "--neuron", "asn",
                              "--param", "m_f=3")
    assert code == 2 and "ann2snn: error: --param m_f=3: must be in (0, 2)" in stderr


def test_every_registered_neuron_keeps_the_contract():
    for name, neuron in neurons.NEURONS.items():
        assert isinstance(neuron, Neuron) and neuron.name == name and neuron is neurons.get(name)
        assert "percentile" in neuron.defaults and neuron.spike_op in ("ac", "mac")
        assert isinstance(neuron.readout(neuron.defaults), Readout)
        assert set(neuron.readout_options) <= set(neuron.defaults)
        if neuron.precision is not None:
            assert neuron.precision.knob in neuron.defaults and neuron.precision.values
        control = neuron.precision_control
        if control is not None:  # the module built takes the policy field arousal sets
            assert hasattr(neuron.build(_params(neuron)), "set_precision")
    with pytest.raises(OptionError, match="^neuron 'lif': expected one of if, asn, vsn"):
        neurons.get("lif")


def _params(neuron: Neuron) -> dict:
    from ann2snn.conversion.statistics import LayerStats

    stats = LayerStats(neurons=4, max=2.0, percentile=1.5, sample=torch.linspace(0.01, 2, 50))
    return neuron.fit(stats, neuron.defaults)


def test_a_new_neuron_type_is_one_description_and_one_registry_line(run_cli, tiny_files, monkeypatch):
    """Registered under a new name, a neuron goes through calibrate, convert and evaluate with no
    other change: nothing downstream looks a type up by its name."""
    toy = Neuron(name="toy", defaults={"percentile": 99.0, "v_init": 0.0}, fit=if_neuron.fit,
                 build=if_neuron.build, readout=if_neuron.readout)
    monkeypatch.setitem(neurons.NEURONS, "toy", toy)
    f = tiny_files
    profile, snn, report = f["dir"] / "toy.json", f["dir"] / "toy.snn.safetensors", f["dir"] / "rep"
    assert run_cli("calibrate", f["checkpoint"], "-m", "conftest:tiny_cnn", "-d", f["data"], "-o", profile,
                   "--neuron", "toy", "--percentile", "99")[0] == 0
    assert json.loads(profile.read_text())["neuron"] == {"type": "toy", "options": {"percentile": 99.0,
                                                                                   "v_init": 0.0}}
    assert run_cli("convert", "--trust-code", f["checkpoint"], "-c", profile, "-o", snn)[0] == 0
    code, out, err = run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-T", "8", "-r", report, "--device", "cpu",
                             "--compare", "if")
    assert code == 0, err
    rep = json.loads((report / "report.json").read_text())
    assert rep["neuron"] == "toy" and rep["label"] == "TOY" and rep["variants"][0]["label"] == "IF"
    assert rep["snn"]["spikes_per_sample"] > 0


def test_safetensors_files_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors orders its metadata by hash map, a new order in every process; ours is canonical."""
    code = ("import sys, torch; from ann2snn.io.files import write_safetensors; "
            "write_safetensors(sys.argv[1], {'w': torch.arange(6.).view(2, 3), 'b': torch.ones(2)}, "
            "{k: k * 2 for k in 'abcdef'})")
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:
        subprocess.run([sys.executable, "-c", code, str(p)], check=True, cwd=ROOT)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    from safetensors import safe_open

    with safe_open(str(paths[0]), "pt") as f:
        assert f.metadata() == {k: k * 2 for k in "abcdef"} and f.get_tensor("w")[1, 2] == 5

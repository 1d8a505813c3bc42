"""Every value a file or an API call brings in is checked where it enters, the same way for the
CLI and the Python API: no silent wrong result from a NaN weight, a negative label, a profile
without its checksum, a per-channel list of the wrong length, or user code that exits."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import ann2snn
from ann2snn.errors import UserError
from conftest import tiny_cnn
from test_hostile import MODEL, _one_line_error, flow  # noqa: F401  (flow: a fixture)


def _resave_artifact(src, dst, edit):
    """The artifact with its tensors edited and its checksum recomputed, as an attacker can."""
    from ann2snn.store.artifact import _digest

    with safe_open(str(src), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta = json.loads(header["ann2snn"])
    edit(tensors, meta)
    header["ann2snn"] = json.dumps(meta, sort_keys=True)
    header["sha256"] = _digest(header["ann2snn"], tensors)
    save_file(tensors, str(dst), metadata=header)
    return dst


def test_an_artifact_with_a_nan_weight_is_refused(run_cli, flow):
    d = flow["dir"]
    key = "conv.weight"

    def edit(tensors, meta):
        assert key in tensors
        tensors[key] = tensors[key].clone()
        tensors[key].view(-1)[0] = float("nan")

    bad = _resave_artifact(flow["snn"], d / "nan.safetensors", edit)
    _one_line_error(run_cli("evaluate", bad, *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "rep"),
                    f"tensor '{key}' holds NaN or infinite values", absent=[d / "rep" / "report.json"])


@pytest.mark.parametrize("inputs,targets,match", [
    (torch.rand(6, 1, 8, 8), torch.tensor([0, 1, -1, 2, 0, 1]), "non-negative class indices"),
    (torch.full((6, 1, 8, 8), float("nan")), torch.tensor([0, 1, 2, 2, 0, 1]), "'inputs' holds NaN"),
    (torch.rand(6, 1, 8, 8), torch.tensor([0.0, 1.0, float("nan"), 0.5, 0.0, 1.0]), "'targets' holds NaN"),
])
def test_the_api_refuses_what_the_cli_refuses(flow, inputs, targets, match):
    snn = ann2snn.load(flow["snn"], model=tiny_cnn())
    with pytest.raises(UserError, match=match):
        ann2snn.evaluate(snn, (inputs, targets), timesteps=4)


def test_a_profile_without_its_weights_checksum_is_still_bound_to_its_weights(run_cli, flow):
    d = flow["dir"]
    other = tiny_cnn()
    with torch.no_grad():
        other.fc2.bias.add_(1.0)
    save_file({k: v.contiguous() for k, v in other.state_dict().items()}, str(d / "other.safetensors"))
    raw = json.loads(flow["profile"].read_text())
    raw["model"].pop("checkpoint_sha256")
    (d / "no_file_sum.json").write_text(json.dumps(raw))
    _one_line_error(run_cli("convert", d / "other.safetensors", *MODEL, "-c", d / "no_file_sum.json",
                            "-o", d / "o.safetensors"), "made for other weights", absent=[d / "o.safetensors"])
    assert run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "no_file_sum.json", "-o", d / "ok.safetensors"
                   )[0] == 0
    raw["model"].pop("weights_sha256")
    (d / "no_sum.json").write_text(json.dumps(raw))
    _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "no_sum.json",
                            "-o", d / "o.safetensors"), "holds no checksum", absent=[d / "o.safetensors"])


def test_a_per_channel_list_of_the_wrong_length_is_refused_by_convert(run_cli, flow):
    d = flow["dir"]
    raw = json.loads(flow["profile"].read_text())
    layer = raw["layers"][0]
    channels = layer["shape"][0]
    layer["params"]["threshold"] = [1.0] * (channels + 1)
    (d / "bad.json").write_text(json.dumps(raw))
    _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "bad.json", "-o", d / "o.safetensors"),
                    f"layer {layer['name']}: threshold has {channels + 1} per-channel values, the layer has "
                    f"{channels} channels", absent=[d / "o.safetensors"])


def test_a_recorded_layer_shape_that_is_not_the_models_is_refused(run_cli, flow):
    d = flow["dir"]

    def edit(tensors, meta):
        meta["layers"][0]["shape"][0] += 1

    bad = _resave_artifact(flow["snn"], d / "shape.safetensors", edit)
    _one_line_error(run_cli("evaluate", bad, *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "rep"),
                    "the model's layer has shape", absent=[d / "rep" / "report.json"])


def test_user_code_that_calls_sys_exit_does_not_end_the_command_with_success(run_cli, flow, tmp_path, monkeypatch):
    (tmp_path / "quitter.py").write_text("import sys\n\ndef make():\n    sys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    d = flow["dir"]
    code, out, err = run_cli("calibrate", flow["checkpoint"], "-m", "quitter:make", "-d", flow["data"],
                             "-o", d / "q.json")
    assert code != 0 and "called sys.exit(0)" in err and len(err.strip().splitlines()) == 1, (code, err)
    assert not (d / "q.json").exists()


def test_artifact_layers_are_the_networks_layers(run_cli, flow):
    d = flow["dir"]
    bad = _resave_artifact(flow["snn"], d / "dup.safetensors", lambda t, m: m["layers"].append(m["layers"][0]))
    _one_line_error(run_cli("evaluate", bad, *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "rep"),
                    "are not the network's spiking layers", absent=[d / "rep" / "report.json"])


@pytest.mark.parametrize("make,match", [
    (lambda w: w.double().index_fill(1, torch.tensor([0]), 1e300), "NaN or infinite values (in float32)"),
    (lambda w: w.to(torch.float8_e4m3fn), None),
    (lambda w: w.to(torch.complex64), "complex values"),
])
def test_values_beyond_float32_float8_and_complex_weights(run_cli, flow, make, match):
    d = flow["dir"]
    bad = _resave_artifact(flow["snn"], d / "w.safetensors",
                           lambda t, m: t.__setitem__("fc1.weight", make(t["fc1.weight"]).contiguous()))
    code, out, err = run_cli("evaluate", bad, *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "rep")
    assert "Traceback" not in err
    if match:
        _one_line_error((code, out, err), match, absent=[d / "rep" / "report.json"])
    state = {k: v.contiguous() for k, v in tiny_cnn().state_dict().items()}
    state["fc1.weight"] = make(state["fc1.weight"]).contiguous()
    save_file(state, str(d / "w_ckpt.safetensors"))
    code, out, err = run_cli("calibrate", d / "w_ckpt.safetensors", *MODEL, "-d", flow["data"], "-o", d / "q.json")
    assert "Traceback" not in err and (code == 0 if match is None else match in err), err


def test_json_numbers_beyond_a_float_are_refused(run_cli, flow):
    d = flow["dir"]
    text = flow["profile"].read_text()
    import re

    for big in ("1e400", "9" * 400):
        (d / "big.json").write_text(re.sub(r'"max": [0-9.e+-]+', f'"max": {big}', text, count=1))
        _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "big.json", "-o", d / "o.safetensors"),
                        "beyond the range of a float", absent=[d / "o.safetensors"])


def test_demo_checks_its_options_before_writing(run_cli, tmp_path):
    _one_line_error(run_cli("demo", "-T", 0, "-o", tmp_path / "d"), "--timesteps 0: must be positive",
                    absent=[tmp_path / "d"])

"""Bad input: a one-line error naming the culprit, exit status 2, no traceback, no output."""

import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import tiny_cnn


def gelu_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.GELU(), nn.Linear(8, 3))


def not_a_module():
    return 42


class Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch EVIL_RAN",))


def _assert_clean_error(code, out, err, match, outputs=()):
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error:"), err
    assert "Traceback" not in err + out
    assert match in lines[0], lines[0]
    for path in outputs:
        assert not path.exists(), path
    parents = {p.parent for p in outputs if p.parent.exists()}
    leftovers = [p for d in parents for p in d.iterdir() if p.name.endswith(".part")]
    assert not leftovers


CAL = ["--model", "conftest:tiny_cnn", "--samples", "20"]


def _cal(f, *extra, model=None, ckpt=None, data=None):
    args = ["calibrate", ckpt or f["checkpoint"], "-d", data or f["data"], "-o", f["dir"] / "out.json", *CAL, *extra]
    if model:
        args[args.index("conftest:tiny_cnn")] = model
    return args


def test_missing_checkpoint(run_cli, tiny_files):
    f = tiny_files
    _assert_clean_error(*run_cli(*_cal(f, ckpt=f["dir"] / "nope.safetensors")), "nope.safetensors: checkpoint not found",
                        [f["dir"] / "out.json"])


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, None])
def test_corrupt_or_truncated_safetensors(run_cli, tiny_files, content):
    f = tiny_files
    bad = f["dir"] / "bad.safetensors"
    bad.write_bytes(content if content is not None else f["checkpoint"].read_bytes()[:300])
    _assert_clean_error(*run_cli(*_cal(f, ckpt=bad)), "bad.safetensors: not a readable .safetensors file",
                        [f["dir"] / "out.json"])


def test_pickle_with_code_is_refused_and_never_runs(run_cli, tiny_files, monkeypatch):
    f = tiny_files
    monkeypatch.chdir(f["dir"])
    bad = f["dir"] / "evil.pt"
    bad.write_bytes(pickle.dumps({"state_dict": Evil()}))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=bad)), "evil.pt: refused to unpickle", [f["dir"] / "out.json"])
    assert not (f["dir"] / "EVIL_RAN").exists()


def test_corrupt_pt_file(run_cli, tiny_files):
    f = tiny_files
    bad = f["dir"] / "bad.pt"
    bad.write_bytes(b"\x00\x01 not a zip")
    code, out, err = run_cli(*_cal(f, ckpt=bad))
    _assert_clean_error(code, out, err, "bad.pt:", [f["dir"] / "out.json"])


def test_plain_pt_state_dict_loads(run_cli, tiny_files):
    f = tiny_files
    pt = f["dir"] / "w.pt"
    torch.save({"state_dict": tiny_cnn().state_dict()}, pt)
    code, _, err = run_cli(*_cal(f, ckpt=pt))
    assert code == 0, err


def test_weights_of_the_wrong_shape(run_cli, tiny_files):
    f = tiny_files
    state = tiny_cnn().state_dict()
    state["fc1.weight"] = torch.zeros(16, 10)
    bad = f["dir"] / "shape.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=bad)), "tensor 'fc1.weight' has shape (16, 10)", [f["dir"] / "out.json"])


def test_nan_weights(run_cli, tiny_files):
    f = tiny_files
    state = tiny_cnn().state_dict()
    state["conv.weight"][0, 0, 0, 0] = float("nan")
    bad = f["dir"] / "nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=bad)), "'conv.weight' holds NaN", [f["dir"] / "out.json"])


@pytest.mark.parametrize("model,match", [
    ("no_such_module_xyz:make", "cannot import module 'no_such_module_xyz'"),
    ("test_errors:not_a_module", "returned int, not a torch.nn.Module"),
    ("test_errors:missing_fn", "has no attribute 'missing_fn'"),
    ("resnet_huge", "not a zoo model"),
])
def test_bad_model_reference(run_cli, tiny_files, model, match):
    f = tiny_files
    _assert_clean_error(*run_cli(*_cal(f, model=model)), match, [f["dir"] / "out.json"])


def tanh_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Tanh(), nn.Linear(8, 3))


def test_unsupported_operation_is_named(run_cli, tiny_files):
    f = tiny_files
    ckpt = f["dir"] / "tanh.safetensors"
    save_file({k: v.contiguous() for k, v in tanh_model().state_dict().items()}, str(ckpt))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=ckpt, model="test_errors:tanh_model")),
                        "node '_2' 2 (Tanh): train with ReLU", [f["dir"] / "out.json"])


def test_gelu_layer_is_refused_for_if_with_its_name(run_cli, tiny_files):
    f = tiny_files
    ckpt = f["dir"] / "gelu.safetensors"
    save_file({k: v.contiguous() for k, v in gelu_model().state_dict().items()}, str(ckpt))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=ckpt, model="test_errors:gelu_model")),
                        "layer act0 is GELU: IF neurons replace RELU only (use --neuron vsn", [f["dir"] / "out.json"])


@pytest.mark.parametrize("extra,match", [
    (["--percentile", "101"], "--percentile 101.0: must be in (0, 100]"),
    (["--samples", "0"], "--samples 0: must be positive"),
    (["--param", "tau=3"], "--param tau: not an option of neuron 'if'"),
    (["--neuron", "lif"], "--neuron 'lif'"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_out_of_range_calibration_options(run_cli, tiny_files, extra, match):
    f = tiny_files
    _assert_clean_error(*run_cli(*_cal(f, *extra)), match, [f["dir"] / "out.json"])


def test_missing_and_wrong_shaped_data(run_cli, tiny_files):
    f = tiny_files
    _assert_clean_error(*run_cli(*_cal(f, data="mnist"), "--data-dir", f["dir"] / "empty"),
                        "--dataset mnist: not found", [f["dir"] / "out.json"])
    wrong = f["dir"] / "wrong.safetensors"
    save_file({"inputs": torch.rand(5, 1, 10, 10), "targets": torch.zeros(5, dtype=torch.long)}, str(wrong))
    _assert_clean_error(*run_cli(*_cal(f, data=str(wrong))), "does not accept inputs of shape (1, 10, 10)",
                        [f["dir"] / "out.json"])


def _converted(run_cli, f):
    code, _, err = run_cli(*_cal(f))
    assert code == 0, err
    code, _, err = run_cli("convert", "--trust-code", f["checkpoint"], "-c", f["dir"] / "out.json", "-o", f["dir"] / "snn.safetensors")
    assert code == 0, err
    return f["dir"] / "snn.safetensors"


def test_profile_for_another_checkpoint_or_model(run_cli, tiny_files):
    f = tiny_files
    _converted(run_cli, f)
    other = f["dir"] / "other.safetensors"
    state = {k: (v + 1 if v.is_floating_point() else v).contiguous() for k, v in tiny_cnn().state_dict().items()}
    save_file(state, str(other))
    out = f["dir"] / "snn2.safetensors"
    _assert_clean_error(*run_cli("convert", "--trust-code", other, "-c", f["dir"] / "out.json", "-o", out),
                        "made for other weights", [out])
    _assert_clean_error(*run_cli("convert", "--trust-code", f["checkpoint"], "-c", f["dir"] / "out.json", "-o", out, "-m", "lenet5"),
                        "was made for 'conftest:tiny_cnn'", [out])
    junk = f["dir"] / "junk.json"
    junk.write_text("{\"format\": \"something-else\"}")
    _assert_clean_error(*run_cli("convert", "--trust-code", f["checkpoint"], "-c", junk, "-o", out),
                        "junk.json: not an ann2snn calibration profile", [out])


def test_edited_artifact_is_refused(run_cli, tiny_files):
    f = tiny_files
    snn = _converted(run_cli, f)
    raw = bytearray(snn.read_bytes())
    i = raw.find(b"threshold")
    raw[i:i + 9] = b"thresholD"
    snn.write_bytes(bytes(raw))
    rep = f["dir"] / "rep"
    _assert_clean_error(*run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-T", 4, "-r", rep), "checksum mismatch",
                        [rep / "report.json"])


@pytest.mark.parametrize("extra,match", [
    (["-T", "-3"], "--timesteps -3: must be positive"),
    (["-T", "4", "--limit", "0"], "--limit 0: must be positive"),
    (["-T", "4", "--energy", "7nm"], "--energy '7nm'"),
])
def test_out_of_range_evaluation_options(run_cli, tiny_files, extra, match):
    f = tiny_files
    snn = _converted(run_cli, f)
    rep = f["dir"] / "rep"
    _assert_clean_error(*run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-r", rep, *extra), match, [rep / "report.json"])


def test_evaluate_on_data_of_another_shape(run_cli, tiny_files):
    f = tiny_files
    snn = _converted(run_cli, f)
    wrong = f["dir"] / "wrong.safetensors"
    save_file({"inputs": torch.rand(5, 3, 8, 8), "targets": torch.zeros(5, dtype=torch.long)}, str(wrong))
    rep = f["dir"] / "rep"
    _assert_clean_error(*run_cli("evaluate", "--trust-code", snn, "-d", wrong, "-T", 4, "-r", rep),
                        "samples have shape (3, 8, 8), the artifact expects (1, 8, 8)", [rep / "report.json"])


def test_not_an_artifact(run_cli, tiny_files):
    f = tiny_files
    rep = f["dir"] / "rep"
    _assert_clean_error(*run_cli("evaluate", "--trust-code", f["checkpoint"], "-d", f["data"], "-T", 4, "-r", rep),
                        "not an ann2snn SNN artifact", [rep / "report.json"])


def test_infinite_weights(run_cli, tiny_files):
    f = tiny_files
    state = tiny_cnn().state_dict()
    state["fc2.bias"][1] = float("inf")
    bad = f["dir"] / "inf.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(bad))
    _assert_clean_error(*run_cli(*_cal(f, ckpt=bad)), "'fc2.bias' holds NaN or infinite", [f["dir"] / "out.json"])


def _archive(f, model=None):
    path = f["dir"] / "model.pt2"
    torch.export.save(torch.export.export(model or tiny_cnn(), (torch.zeros(2, 1, 8, 8),)), str(path))
    return path


def test_truncated_export_archive(run_cli, tiny_files):
    f = tiny_files
    bad = f["dir"] / "cut.pt2"
    bad.write_bytes(_archive(f).read_bytes()[:2000])
    _assert_clean_error(*run_cli("calibrate", bad, "-d", f["data"], "-o", f["dir"] / "out.json"),
                        "cut.pt2: not a readable torch.export archive", [f["dir"] / "out.json"])


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 3)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc(x * torch.sigmoid(x))


def test_export_archive_with_an_unsupported_operation(run_cli, tiny_files):
    f = tiny_files
    path = _archive(f, Gated().eval())
    _assert_clean_error(*run_cli("calibrate", path, "-d", f["data"], "-o", f["dir"] / "out.json"),
                        "the graph uses aten.mul.Tensor", [f["dir"] / "out.json"])  # named, never called


def test_model_option_and_archives(run_cli, tiny_files):
    f = tiny_files
    path = _archive(f)
    _assert_clean_error(*run_cli("calibrate", path, "-d", f["data"], "-o", f["dir"] / "out.json", "-m", "lenet5"),
                        "model.pt2 is a torch.export archive", [f["dir"] / "out.json"])
    _assert_clean_error(*run_cli("calibrate", f["checkpoint"], "-d", f["data"], "-o", f["dir"] / "out.json"),
                        "--model: required for", [f["dir"] / "out.json"])


@pytest.mark.parametrize("extra,match", [
    (["--budget", "0", "-T", "4"], "--budget 0"),
    (["--budget", "-5", "-T", "4"], "--budget -5"),
    (["--batch-size", "0"], "--batch-size 0: must be positive"),
])
def test_zero_or_negative_budget_and_batch(run_cli, tiny_files, extra, match):
    f = tiny_files
    _assert_clean_error(*run_cli(*_cal(f, *extra)), match, [f["dir"] / "out.json"])


def test_truncated_calibration_profile(run_cli, tiny_files):
    f = tiny_files
    _converted(run_cli, f)
    profile = f["dir"] / "out.json"
    profile.write_text(profile.read_text()[:200])
    out = f["dir"] / "snn2.safetensors"
    _assert_clean_error(*run_cli("convert", "--trust-code", f["checkpoint"], "-c", profile, "-o", out), "out.json:", [out])


@pytest.mark.parametrize("extra,match", [
    (["--sweep", "tau=1,2"], "--sweep tau: not an option of neuron 'if'"),
    (["--compare", "lif"], "--compare 'lif'"),
    (["--arousal"], "--arousal: needs an ASN or VSN artifact"),
    (["--start-ms", "9"], "--start-ms 9: must be in [0, timesteps)"),
])
def test_evaluation_variants_that_do_not_apply(run_cli, tiny_files, extra, match):
    f = tiny_files
    snn = _converted(run_cli, f)
    rep = f["dir"] / "rep"
    _assert_clean_error(*run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-r", rep, "-T", 4, *extra), match,
                        [rep / "report.json"])


def test_ctrl_c_mid_evaluation_leaves_no_report(run_cli, tiny_files):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    f = tiny_files
    snn = _converted(run_cli, f)
    rep = f["dir"] / "rep"
    argv = ["ann2snn", "evaluate", "--trust-code", str(snn), "-d", str(f["data"]), "-T", "1000000", "-r", str(rep), "--device", "cpu"]
    script = ("import sys, ann2snn.app.entry as entry; sys.argv = %r; print('ready', flush=True); entry.main()" % argv)
    tests = str(Path(__file__).parent)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tests, env={**os.environ, "PYTHONPATH": path})
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(2.0)  # inside the simulation: one sample takes far longer than this
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert err.strip() == "ann2snn: error: interrupted; no partial output was written"
    assert not rep.exists() or not any(rep.iterdir())


def test_interrupted_report_writing_leaves_nothing(run_cli, tiny_files, monkeypatch):
    import ann2snn.evaluation.report

    f = tiny_files
    snn = _converted(run_cli, f)
    rep = f["dir"] / "rep"

    def interrupted(*args, **kwargs):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ann2snn.evaluation.report, "figure", interrupted)  # Ctrl-C while the plot is drawn
    code, out, err = run_cli("evaluate", "--trust-code", snn, "-d", f["data"], "-r", rep, "-T", 4, "--device", "cpu")
    assert code == 130 and err.strip() == "ann2snn: error: interrupted; no partial output was written"
    assert not rep.exists() or not list(rep.iterdir())

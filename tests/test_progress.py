"""Long steps report progress on stderr only: bars on a terminal, else a plain line every 30 s."""

import io

from ann2snn import progress


def test_plain_lines_come_at_most_every_30_seconds_with_an_estimate():
    now = [0.0]
    stream = io.StringIO()
    line = progress.PlainLine("simulating", 100, stream, clock=lambda: now[0])
    for t in (10.0, 20.0, 31.0, 40.0, 62.0):
        now[0] = t
        line.advance(10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # at 31 s and at 62 s
    assert lines[0] == "ann2snn: simulating: 30/100 done after 31 s, about 72 s left"
    assert lines[1].startswith("ann2snn: simulating: 50/100 done after 62 s")


def test_the_cli_reports_on_stderr_and_keeps_stdout_for_tables(run_cli, tiny_files, monkeypatch):
    seen = []

    class Recorder(progress.Task):
        def __init__(self, label, total):
            self.label, self.total, self.done = label, total, 0
            seen.append(self)

        def advance(self, n=1):
            self.done += n

    monkeypatch.setattr(progress, "PlainLine", lambda label, total, stream: Recorder(label, total))
    d = tiny_files["dir"]
    code, out, err = run_cli("calibrate", tiny_files["checkpoint"], "-m", "conftest:tiny_cnn", "-d", tiny_files["data"],
                             "--samples", 40, "--neuron", "asn", "--budget", "1000", "-T", 10, "-o", d / "p.json")
    assert code == 0, err
    labels = [s.label for s in seen]
    assert labels[0].startswith("calibration statistics") and seen[0].done >= 40
    searched = [s for s in seen if s.label.startswith("budget search m_f=")]
    assert len(searched) == 9 and all(s.done == s.total == 40 for s in searched)
    assert "budget search" not in out and progress._reporter is None  # uninstalled after the command

"""The progress reporter of long commands: a bar on a terminal, one plain line per item in a log."""

from __future__ import annotations

import io
import re

from rich.console import Console

from fuselab.cli import RunProgress, _clock, _duration


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=terminal, width=80, color_system=None), buffer


def test_a_log_gets_one_plain_line_per_item_with_count_eta_and_failures(monkeypatch):
    out, buffer = _console(terminal=False)
    import types

    clock = iter([100.0, 100.0, 110.0, 110.0, 130.0, 131.0])  # made and entered, then one reading per item
    monkeypatch.setattr("fuselab.cli.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    with RunProgress(4, label="runs", out=out) as progress:
        assert progress.bar is None
        progress.advance("concat seed 0", "trained", detail="test accuracy 91.00 %")
        progress.advance("sum seed 0", "already in the store", detail="test accuracy 90.00 %", worked=False)
        progress.advance("lmf seed 0", "failed", detail="RuntimeError: out of memory")
        progress.advance("lmf seed 1", "trained", detail="test accuracy 89.50 %")
    lines = buffer.getvalue().splitlines()
    assert lines == [
        "[1/4] 0:10 elapsed, ETA 0:30  concat seed 0: trained, test accuracy 91.00 %  (0 failed)",
        # a run read back from the store took no time: the pace stays that of the trained run
        "[2/4] 0:10 elapsed, ETA 0:20  sum seed 0: already in the store, test accuracy 90.00 %  (0 failed)",
        "[3/4] 0:30 elapsed, ETA 0:15  lmf seed 0: failed, RuntimeError: out of memory  (1 failed)",
        "[4/4] 0:31 elapsed, ETA 0:00  lmf seed 1: trained, test accuracy 89.50 %  (1 failed)",
    ]


def test_eta_is_unknown_until_an_item_has_worked():
    out, buffer = _console(terminal=False)
    with RunProgress(3, out=out) as progress:
        progress.advance("a seed 0", "already in the store", worked=False)
    assert re.search(r"ETA \?  a seed 0", buffer.getvalue())


def test_a_terminal_gets_a_bar_and_no_plain_lines():
    out, buffer = _console(terminal=True)
    with RunProgress(2, label="runs", out=out) as progress:
        assert progress.bar is not None
        progress.advance("concat seed 0", "trained", info="trained 1")
        progress.advance("sum seed 0", "trained", info="trained 2")
    text = buffer.getvalue()
    assert "elapsed, ETA" not in text and "2/2" in text and "runs" in text


def test_durations_read_as_clock_times():
    assert _clock(5) == "0:05" and _clock(65) == "1:05" and _clock(3725) == "1:02:05"
    assert _duration(12.34) == "12.3 s" and _duration(75) == "1:15"

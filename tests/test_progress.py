"""Plain-line progress (stdout not a terminal): the cadence, the seconds per edit and the ETA."""

import io
import re

import pytest

from orchestrator.progress import Progress, resolve_mode


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines(text):
    return [re.sub(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ", "", line) for line in text.splitlines()]


def test_lines_every_n_edits_or_m_seconds_with_rate_and_eta(capsys):
    clock = Clock()
    progress = Progress("lines", every_edits=3, every_seconds=60, clock=clock)
    progress.open([("t", "m/rome/cf/seed0", 10, 2)])  # resumed: 2 of 10 steps already done
    for step, seconds in [(3, 30), (4, 2), (5, 2), (6, 2), (7, 70), (8, 2), (9, 2), (10, 2)]:
        clock.now += seconds
        progress.edited("t", step)
    progress.scored("t", 10, [{"task": "edit/toolkit", "metric": "reliability", "value": 1.0},
                              {"task": "wikitext", "metric": "perplexity", "value": 1234.5},
                              {"task": "wikitext", "metric": "bits", "value": 3.0}])
    assert lines(capsys.readouterr().out) == [
        "m/rome/cf/seed0: 3/10 edits, s/edit not yet measured (the first step includes the set-up)",
        "m/rome/cf/seed0: 6/10 edits, 2 s/edit, ETA 0:00:08",  # 3 steps after the first, 6 s
        "m/rome/cf/seed0: 7/10 edits, 19 s/edit, ETA 0:00:57",  # 60 s since the last line
        "m/rome/cf/seed0: 10/10 edits, 11.7 s/edit, ETA 0:00:00",  # the last step: 82 s / 7
        "m/rome/cf/seed0: scored at 10 edits (3 scores): reliability 1.000, wikitext perplexity 1234",
    ]


def test_auto_means_bars_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert resolve_mode("auto", Terminal()) == "bars" and resolve_mode(True, Terminal()) == "bars"
    assert resolve_mode("auto", io.StringIO()) == "lines" and resolve_mode(False) == "none"
    with pytest.raises(ValueError, match="expected one of"):
        resolve_mode("fancy")

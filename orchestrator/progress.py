"""How a run reports its progress: tqdm bars on a terminal, plain lines anywhere else.

Under ``ray job submit`` or ``eac run ... > log`` stdout is a pipe or a file, where nested bars
become thousands of carriage-return fragments. There every trajectory prints one line every
``every_edits`` edit steps or ``every_seconds`` seconds (whichever comes first, and at its last step)::

    2025-01-01 12:00:00 tiny-gpt2/rome/counterfact/seed3: 120/1000 edits, 2.31 s/edit, ETA 0:33:52

and one line per checkpoint scored, with its headline scores. Seconds per edit are wall-clock time
from the end of the trajectory's first step in this run: the first step also paid for the actor's
set-up (model, statistics), as the bars' ETA also leaves it out.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

MODES = ("auto", "bars", "lines", "none")
EDIT_METRICS = ("reliability", "generalisation", "locality")  # of the edit/toolkit task, when scored


def resolve_mode(mode: str | bool, stream=None) -> str:
    """``auto`` (or True): bars when stdout is a terminal, lines otherwise; False: ``none``."""
    if mode is True:
        mode = "auto"
    elif mode is False:
        mode = "none"
    if mode not in MODES:
        raise ValueError(f"progress {mode!r}: expected one of {list(MODES)}")
    if mode == "auto":
        stream = stream if stream is not None else sys.stdout
        return "bars" if getattr(stream, "isatty", lambda: False)() else "lines"
    return mode


@dataclass
class Tracked:
    """What is known of one trajectory's progress in this run."""

    label: str
    total: int
    done: int
    first_done: int | None = None  # steps done when its first step of this run ended
    first_time: float = 0.0
    reported_done: int = -1
    reported_time: float = 0.0
    bar: object = None


@dataclass
class Progress:
    """One reporter per run; trajectories are keyed by their id."""

    mode: str = "lines"
    every_edits: int = 10
    every_seconds: float = 30.0
    clock: object = time.monotonic
    tracked: dict[str, Tracked] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in ("bars", "lines", "none"):
            raise ValueError(f"progress mode {self.mode!r}: resolve 'auto' first (resolve_mode)")
        if self.every_edits < 1 or not self.every_seconds > 0:
            raise ValueError(f"progress every {self.every_edits} edits / {self.every_seconds} s: both must be > 0")

    def open(self, trajectories: list[tuple[str, str, int, int]]) -> None:
        """``trajectories``: (id, label, steps in all, steps already done) of each one to run."""
        width = max((len(label) for _, label, _, _ in trajectories), default=0)
        for position, (tid, label, total, done) in enumerate(trajectories):
            tracked = Tracked(label, total, done)
            if self.mode == "bars":
                from tqdm.auto import tqdm

                tracked.bar = tqdm(total=total, initial=done, desc=label.ljust(width), unit="edit",
                                   position=position, leave=True, dynamic_ncols=True, mininterval=1.0)
            self.tracked[tid] = tracked

    def restarted(self, tid: str, done: int, message: str) -> None:
        """The trajectory starts again from ``done`` steps (its actor died)."""
        tracked = self.tracked[tid]
        tracked.done, tracked.first_done = done, None
        if tracked.bar is not None:
            tracked.bar.n = done
        self.message(f"{tracked.label}: {message}")

    def edited(self, tid: str, done: int) -> None:
        """One more edit step ended; ``done`` steps are done in all."""
        tracked, now = self.tracked[tid], self.clock()
        tracked.done = done
        first = tracked.first_done is None
        if first:
            tracked.first_done, tracked.first_time = done, now
        if tracked.bar is not None:
            if first:  # the ETA is timed from the edits after the set-up
                tracked.bar.reset(total=tracked.total)
                tracked.bar.initial = tracked.bar.n = done
                tracked.bar.refresh()
            else:
                tracked.bar.update(1)
            return
        if self.mode != "lines":
            return
        if (done - tracked.reported_done >= self.every_edits or now - tracked.reported_time >= self.every_seconds
                or done == tracked.total or tracked.reported_done < 0):
            tracked.reported_done, tracked.reported_time = done, now
            self._line(f"{tracked.label}: {done}/{tracked.total} edits, {self._rate(tracked, now)}")

    def scored(self, tid: str, checkpoint: int, rows: list[dict]) -> None:
        if self.mode != "lines":
            return
        scores = {(row["task"], row["metric"]): row["value"] for row in rows}
        shown = [f"{metric} {scores[('edit/toolkit', metric)]:.3f}" for metric in EDIT_METRICS
                 if ("edit/toolkit", metric) in scores]
        shown += [f"{task} {metric} {value:.4g}" for (task, metric), value in sorted(scores.items())
                  if not task.startswith("edit/") and metric == headline_metric(task, scores)]
        self._line(f"{self.tracked[tid].label}: scored at {checkpoint} edits ({len(rows)} scores): "
                   + (", ".join(shown) or "no headline score"))

    def finished(self, tid: str, status: str) -> None:
        if self.mode == "lines" and tid in self.tracked:
            self._line(f"{self.tracked[tid].label}: {status}")

    def message(self, text: str) -> None:
        """A line said whatever the mode (a restart, a failure), without breaking the bars."""
        if self.mode == "bars":
            from tqdm.auto import tqdm

            tqdm.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        for tracked in self.tracked.values():
            if tracked.bar is not None:
                tracked.bar.close()

    @staticmethod
    def _rate(tracked: Tracked, now: float) -> str:
        steps = tracked.done - (tracked.first_done or 0)
        if tracked.first_done is None or steps <= 0:
            return "s/edit not yet measured (the first step includes the set-up)"
        seconds = (now - tracked.first_time) / steps
        left = seconds * (tracked.total - tracked.done)
        return f"{seconds:.3g} s/edit, ETA {timedelta(seconds=math.ceil(left))}"

    @staticmethod
    def _line(text: str) -> None:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}", flush=True)


def headline_metric(task: str, scores: dict) -> str | None:
    """The task's headline metric (the report's), else its first metric by name."""
    from workers.evaluation.metrics import HEADLINE

    if task in HEADLINE:
        return HEADLINE[task]
    names = sorted(metric for (t, metric) in scores if t == task)
    return names[0] if names else None

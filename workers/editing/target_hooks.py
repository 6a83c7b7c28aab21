"""What a constraint may change in the shared target optimisation, without the base method knowing
which constraint it is: an extra stopping rule inside the optimiser, and a rewrite of the solved
targets between the optimisation and the weight update.

The Editor builds one ``TargetHooks`` per editor from the constraint's registry entry and leaves it
in the edit context (``EditContext.target_hooks``); ROME, MEMIT and AlphaEdit pass ``new_stop()`` to
the optimiser and call ``finish`` on the results before they compute their update. Without a
constraint both are no-ops, so the bases behave exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from workers.editing.targets import OptimisationResult, StopRule, TargetBatch

# Rewrites each result's δ in place (the solved target is problem.v_inits[r] + results[r].delta).
TargetRewrite = Callable[[TargetBatch, list[OptimisationResult]], None]


@dataclass(frozen=True)
class TargetHooks:
    stop: Callable[[], StopRule] | None = None  # makes a fresh stopping rule for one optimisation
    rewrite: TargetRewrite | None = None

    def new_stop(self) -> StopRule | None:
        return None if self.stop is None else self.stop()

    def finish(self, problem: TargetBatch, results: list[OptimisationResult]) -> None:
        if self.rewrite is not None:
            self.rewrite(problem, results)

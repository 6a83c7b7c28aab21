"""Which scores stand for a general task: the metrics each task is reported by, its headline metric,
and the retention read off a checkpoint's rows — tables over the task registry
(``workers.evaluation.tasks.TASKS``), one row per record. The figures, the run summary, the progress
line and the tuning objective all read these definitions.

Retention rows are written by the evaluation as ``retention/<metric>`` = edited / unedited score of
the same examples (none when the unedited score is 0).
"""

from __future__ import annotations

import math

from workers.evaluation.tasks import TASKS

# The scores each general task is plotted by; the first is its headline score (the paper's protocol).
# Classification tasks also show the label log-likelihood accuracy, which stays informative for small
# models whose greedy answers are rarely a label word. Other metrics stay in the store.
TASK_METRICS = {name: task.metrics for name, task in TASKS.items()}
HEADLINE = {task: metrics[0] for task, metrics in TASK_METRICS.items()}
# Scores a model reaches by guessing: a two-way label (NLI, SST-2) half the time, an MMLU answer a
# quarter of the time. Retention is measured on the margin above these (see ``retention_rows``).
# ``valid_rate`` and ``accuracy_all`` have no such level (they depend on how often the model answers
# with a label word at all), nor have exact match, ROUGE and perplexity.
CHANCE_LEVELS = {(name, metric): level for name, task in TASKS.items() for metric, level in task.chance.items()}
# Scores that are the share of examples with a 0/1 outcome: their bootstrap interval follows from the
# share and the count alone (``workers.evaluation.intervals.proportion_interval``), also for rows
# stored before intervals were. Token-level shares (edit/toolkit) and per-request means of several
# prompts (paraphrase, neighbourhood) are not 0/1 per example.
BINARY_SCORES = frozenset({(name, metric) for name, task in TASKS.items() for metric in task.binary}
                          | {("edit/counterfact", "efficacy"), ("edit/generative", "reliability")})
# Scores where lower is better (retention is unedited / edited for these) and drawn on a log axis.
LOWER_IS_BETTER = frozenset((name, metric) for name, task in TASKS.items() for metric in task.lower_is_better)
LOG_SCALE_METRICS = frozenset((name, metric) for name, task in TASKS.items() for metric in task.log_scale)


def task_retention(rows) -> dict[str, tuple[str, float]]:
    """Per task, (metric, edited / unedited) for the first plotted metric that has a retention row
    (an unedited score of 0 has none) — from the rows (a DataFrame with ``task``, ``metric`` and
    ``value``) of one checkpoint of one trajectory."""
    out = {}
    for task, metrics in TASK_METRICS.items():
        for metric in metrics:
            found = rows.loc[(rows["task"] == task) & (rows["metric"] == f"retention/{metric}"), "value"]
            if len(found) and not math.isnan(found.iloc[0]):
                out[task] = (metric, float(found.iloc[0]))
                break
    return out

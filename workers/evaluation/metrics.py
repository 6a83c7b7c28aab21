"""Which scores stand for a general task: the metrics each task is reported by, its headline metric,
and the retention read off a checkpoint's rows. The figures, the run summary, the progress line and
the tuning objective all read these definitions.

Retention rows are written by the evaluation as ``retention/<metric>`` = edited / unedited score of
the same examples (none when the unedited score is 0).
"""

from __future__ import annotations

import math

# The scores each general task is plotted by; the first is its headline score (the paper's protocol).
# Classification tasks also show the label log-likelihood accuracy, which stays informative for small
# models whose greedy answers are rarely a label word. Other metrics stay in the store.
TASK_METRICS = {"nli": ("accuracy_all", "label_ll_accuracy"), "sst2": ("accuracy_all", "label_ll_accuracy"),
                "nq": ("exact_match", "contains_answer"), "samsum": ("rouge_mean",),
                "mmlu": ("accuracy_letter", "accuracy_cloze"), "wikitext": ("perplexity",)}
HEADLINE = {task: metrics[0] for task, metrics in TASK_METRICS.items()}
# Scores a model reaches by guessing: a two-way label (NLI, SST-2) half the time, an MMLU answer a
# quarter of the time. Retention is measured on the margin above these (see ``retention_rows``).
# ``valid_rate`` and ``accuracy_all`` have no such level (they depend on how often the model answers
# with a label word at all), nor have exact match, ROUGE and perplexity.
CHANCE_LEVELS = {("nli", "accuracy_valid"): 0.5, ("nli", "label_ll_accuracy"): 0.5,
                 ("sst2", "accuracy_valid"): 0.5, ("sst2", "label_ll_accuracy"): 0.5,
                 ("mmlu", "accuracy_letter"): 0.25, ("mmlu", "accuracy_cloze"): 0.25}
# Scores that are the share of examples with a 0/1 outcome: their bootstrap interval follows from the
# share and the count alone (``workers.evaluation.intervals.proportion_interval``), also for rows
# stored before intervals were. Token-level shares (edit/toolkit) and per-request means of several
# prompts (paraphrase, neighbourhood) are not 0/1 per example.
BINARY_SCORES = frozenset({(task, metric) for task in ("nli", "sst2")
                           for metric in ("accuracy_valid", "accuracy_all", "valid_rate", "label_ll_accuracy")}
                          | {("nq", "exact_match"), ("nq", "contains_answer"), ("mmlu", "accuracy_letter"),
                             ("mmlu", "accuracy_cloze"), ("edit/counterfact", "efficacy"),
                             ("edit/generative", "reliability")})


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

"""Evaluation: editing metrics, general-ability tasks, drift, retention and deviation analysis.

Entry point for the evaluation actors: ``evaluate_checkpoint`` (see ``workers.evaluation.checkpoint``).
Modules: ``config`` (MetricRow, EvalConfig), ``scoring`` (teacher-forced scoring under padding),
``edit_metrics``, ``tasks`` (the registry of general tasks and their scorers), ``metrics`` (tables over
the registry: the scores that stand for each task, retention), ``prompts`` (task prompts, formats,
sampling), ``suite`` (``TaskSuite``: one evaluation's sampled examples), ``text_metrics``, ``reference``
(the unedited model's cached predictions), ``deviation`` (norms, condition numbers, PCA view).
"""

from workers.evaluation.checkpoint import evaluate_checkpoint
from workers.evaluation.config import EvalConfig, MetricRow
from workers.evaluation.suite import TaskSuite
from workers.evaluation.reference import ReferenceCache, model_key

__all__ = ["EvalConfig", "MetricRow", "ReferenceCache", "TaskSuite", "evaluate_checkpoint", "model_key"]

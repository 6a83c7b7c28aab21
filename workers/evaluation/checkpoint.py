"""Evaluate "base model + edit log" without changing the caller's model.

The evaluation actors call::

    evaluate_checkpoint(model, tokenizer, edit_log, requests, config, *, reference=None, tasks=None,
                        base_key=None, data_root=None) -> list[MetricRow]

- ``model`` holds the *base* (unedited) weights. Inside, ``scored_weights(model, edit_log)`` replays the
  log — and, where the log's method scores its checkpoints otherwise (PRUNE applied at evaluation, the
  paper's), rewrites the replayed weights by its constraint's ``checkpoint`` hook — and restores the
  model bit for bit on exit (also on error), so the caller's model is unchanged.
- ``edit_log``: the trajectory's edits so far (``None`` or empty: the base model itself).
- ``requests``: every request edited so far; the editing metrics are computed over all of them.
- ``config``: an ``EvalConfig`` (YAML-loadable).
- ``reference``: a ``ReferenceCache`` holding the unedited model's predictions (locality argmax
  tokens, task scores for retention, next-token distributions for drift, hidden states for the PCA
  view). Pass the same cache (ideally with a directory) for every checkpoint of a base model so they
  are computed once; ``None`` makes a fresh in-memory one for this call.
- ``tasks``: a ``TaskSuite`` built once per (tokenizer, config) to skip reloading and resampling the
  task data (``TaskSuite.load(tokenizer, config)``); ``None`` loads it from ``data_root``.
- ``base_key``: ``model_key(model, tokenizer)`` of the base model, if the caller has it (hashing
  the weights takes about a second for a 135M model).
- ``scorer``: what the forward passes run on — ``scorer.base(model)`` for the unedited model's,
  ``scorer.edited(model)`` (called while ``model`` holds base + log) for the edited one's. ``None``:
  ``model`` itself for both. A tensor-parallel rank passes sharded copies
  (``workers.sharded.TensorParallelScorer``); the log is applied to, and deviations measured on,
  ``model`` in every case.

Rows returned (``MetricRow(task, metric, value, n_examples)``):

- ``edit/toolkit`` reliability / generalisation / locality, ``edit/counterfact`` efficacy /
  paraphrase / neighbourhood, ``edit/generative`` reliability / generalisation (``edit_metrics``);
- per general task its scores (see ``tasks``), and ``retention/<metric>`` = edited / unedited
  (for perplexity unedited / edited, so that 1 means preserved and less means worse in every case;
  for metrics with a chance level c, (edited − c) / (unedited − c)), and ``retention_dropped/<metric>``
  for metrics whose unedited value is not above chance (no retention can be computed);
- ``<task> drift_kl`` and ``drift kl_mean``: next-token KL(edited ‖ unedited) over task prompts;
- ``deviation/<module>`` norms and condition numbers of each edited matrix against the original;
- ``deviation/pca`` separability when ``pca_examples`` > 0.

Every row that is a score over examples carries them (``MetricRow.examples``: the request's case id for
editing metrics, the data-set index for task examples, the window's offset, tokens and NLL for
perplexity, ``<task>/<index>`` for drift prompts), which the store keeps in its ``examples`` table;
the unedited model's cached task rows keep theirs too.

An empty log is the base model: its task rows and next-token distributions are the reference ones
(not recomputed), so its retention is 1 and its drift 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from pathlib import Path
from typing import Sequence

import torch

from workers.data import EditRequest
from workers.editing.delta import EditLog
from workers.editing.methods import scored_weights
from workers.evaluation.config import EvalConfig, Example, MetricRow
from workers.evaluation.deviation import last_token_states, pca_view, snapshot_deviations
from workers.evaluation.edit_metrics import edit_metric_rows, unedited_locality_argmax
from workers.evaluation.metrics import CHANCE_LEVELS, LOWER_IS_BETTER
from workers.evaluation.reference import ReferenceCache, model_key, text_key
from workers.evaluation.scoring import next_token_logprobs
from workers.evaluation.suite import TaskSuite
from workers.evaluation.tasks import TASKS, drift_prompts, drift_rows, example_ids, general_task_rows
from workers.models import context_length
from workers.packed_linear import LinearCompute, linear_names, swapped

class SameModel:
    """The default scorer: the forward passes run on the model itself."""

    def base(self, model):
        return model

    def edited(self, model):
        return model


def suite_digest(suite: TaskSuite, config: EvalConfig) -> str:
    """What the reference task scores depend on besides the weights: the configuration and the exact
    prompts and perplexity windows."""
    return text_key(config.digest(), sorted(suite.prompts.items()),
                    [pair.ids for pair in suite.perplexity_windows])


def reference_task_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig, reference: ReferenceCache,
                        base_key: str) -> list[MetricRow]:
    """The unedited model's general-task rows, computed once per (base model, configuration, sample)."""
    (stored,) = reference.get_or_compute(
        base_key, "task_rows", [suite_digest(suite, config)],
        lambda missing: [[[r.task, r.metric, r.value, r.n_examples, r.ci_low, r.ci_high,
                           [list(dataclasses.astuple(e)) for e in r.examples]]
                          for r in general_task_rows(model, tokenizer, suite, config)]])
    # An entry is [task, metric, value, n, ci_low, ci_high, examples (each Example's fields in order)];
    # one without the interval reads as None, one without examples as none.
    rows = []
    for task, metric, value, n, *rest in stored:
        low, high, examples = (list(rest) + [None, None, []])[:3]
        rows.append(MetricRow(task, metric, float(value), int(n), low, high,
                              tuple(Example(*fields) for fields in examples)))
    return rows


def _cached_per_prompt(model, tokenizer, prompts: list[str], reference: ReferenceCache, base_key: str,
                       namespace: str, compute, config: EvalConfig, add_special_tokens: bool) -> torch.Tensor:
    keys = [text_key(prompt) for prompt in prompts]
    values = reference.get_or_compute(base_key, namespace, keys, lambda missing: list(compute(
        model, tokenizer, [prompts[i] for i in missing], batch_size=config.batch_size,
        add_special_tokens=add_special_tokens, progress=config.progress)))
    return torch.stack(values) if values else torch.zeros((0, 0))


def retention_rows(edited: Sequence[MetricRow], unedited: Sequence[MetricRow]) -> list[MetricRow]:
    """``retention/<metric>`` per general-task metric: edited / unedited (unedited / edited where lower is
    better), and for a metric with a known chance level c (``CHANCE_LEVELS``) the share of the
    unedited model's margin above chance that is kept, (edited − c) / (unedited − c): a binary
    accuracy that falls from 0.55 to 0.50 has lost all of its signal, not 9% of it, and 0 means
    chance, whatever c is. A metric whose unedited margin (above chance, or the value itself) is 0
    or less has no retention; it is listed as ``retention_dropped/<metric>`` with that margin."""
    base = {(r.task, r.metric): r.value for r in unedited}
    rows = []
    for row in edited:
        before = base.get((row.task, row.metric))
        if row.task not in TASKS or before is None or math.isnan(before) or math.isnan(row.value):
            continue
        chance = CHANCE_LEVELS.get((row.task, row.metric), 0.0)
        if (row.task, row.metric) in LOWER_IS_BETTER:
            numerator, denominator = before, row.value
        else:
            numerator, denominator = row.value - chance, before - chance
        if denominator <= 0:
            rows.append(MetricRow(row.task, f"retention_dropped/{row.metric}", denominator, row.n_examples))
            continue
        rows.append(MetricRow(row.task, f"retention/{row.metric}", numerator / denominator, row.n_examples))
    return rows


def evaluate_checkpoint(model, tokenizer, edit_log: EditLog | None, requests: Sequence[EditRequest],
                        config: EvalConfig, *, reference: ReferenceCache | None = None,
                        tasks: TaskSuite | None = None, base_key: str | None = None,
                        data_root: str | Path | None = None, scorer=None,
                        compute: LinearCompute | None = None) -> list[MetricRow]:
    """Score base model + ``edit_log`` (see the module docstring); ``model`` is left as it was.
    ``compute``: how the passes on ``model`` itself compute their linear layers (default: packed,
    in ``config.compute_dtype``); a scorer's own copies are left to it."""
    own_passes = scorer is None
    scorer = scorer if scorer is not None else SameModel()
    compute = compute if compute is not None else LinearCompute(dtype=config.products_dtype)
    reference = reference if reference is not None else ReferenceCache()
    suite = tasks if tasks is not None else TaskSuite.load(tokenizer, config, data_root,
                                                           context_length=context_length(model))
    base_key = base_key or model_key(model, tokenizer)
    log = edit_log if edit_log is not None else EditLog()
    batching = dict(batch_size=config.batch_size, progress=config.progress)

    def packed(weights):
        """The passes on ``weights`` (the model, base or edited) with its linear layers packed once."""
        return swapped(compute.pack(weights, linear_names(weights, [""]), gradients=False) if own_passes else None)

    # The unedited model's predictions, while the model holds the base weights.
    unedited = scorer.base(model)
    with packed(unedited):
        locality_reference, unedited_rows, unedited_logprobs, unedited_states = _unedited_passes(
            unedited, tokenizer, requests, config, suite, reference, base_key, batching)
    prompts_for_drift = drift_prompts(suite, config)

    context = scored_weights(model, log)  # base + log, and what the log's constraint does at a checkpoint
    with context:
        edited = scorer.edited(model) if len(log) else unedited
        with packed(edited) if len(log) else contextlib.nullcontext():
            rows = edit_metric_rows(edited, tokenizer, requests, families=config.edit_metrics,
                                    locality_reference=locality_reference,
                                    generative_max_new_tokens=config.generative_max_new_tokens, **batching)
            edited_rows = general_task_rows(edited, tokenizer, suite, config) if len(log) else unedited_rows
            rows += edited_rows + retention_rows(edited_rows, unedited_rows)
            if prompts_for_drift:
                edited_logprobs = ({task: next_token_logprobs(edited, tokenizer, prompts,
                                                              add_special_tokens=suite.format.add_special_tokens,
                                                              **batching)
                                    for task, prompts in prompts_for_drift.items()} if len(log)
                                   else unedited_logprobs)
                rows += drift_rows(edited_logprobs, unedited_logprobs,
                                   {task: example_ids(suite, task) for task in prompts_for_drift})
            edited_states = (last_token_states(edited, tokenizer, suite.pca_prompts,
                                               add_special_tokens=suite.format.add_special_tokens, **batching)
                             if unedited_states is not None else None)
        if config.deviation_norms:  # reads the model's own weight matrices: outside the packed passes
            for deviation in snapshot_deviations(model, context.snapshot):
                rows += deviation.rows()
        if unedited_states is not None:
            rows += pca_view(unedited_states, edited_states, folds=config.pca_folds, seed=config.seed).rows()
    return rows


def _unedited_passes(unedited, tokenizer, requests, config: EvalConfig, suite: TaskSuite,
                     reference: ReferenceCache, base_key: str, batching: dict):
    """The unedited model's predictions (from ``reference`` where cached): locality argmax tokens,
    task rows, next-token log-probabilities of the drift prompts, last-token states for the PCA view."""
    locality_reference = None
    if "toolkit" in config.edit_metrics and requests:
        locality_reference = unedited_locality_argmax(unedited, tokenizer, requests, reference, base_key,
                                                      **batching)
    unedited_rows = reference_task_rows(unedited, tokenizer, suite, config, reference, base_key)
    unedited_logprobs = {task: _cached_per_prompt(unedited, tokenizer, prompts, reference, base_key,
                                                  "next_token_logprobs", next_token_logprobs, config,
                                                  suite.format.add_special_tokens)
                         for task, prompts in drift_prompts(suite, config).items()}
    unedited_states = None
    if config.pca_examples and not suite.pca_prompts:
        raise ValueError(f"pca_examples is {config.pca_examples} but the TaskSuite holds no PCA prompts; build it "
                         "with the same EvalConfig (TaskSuite.load(tokenizer, config))")
    if config.pca_examples:
        unedited_states = _cached_per_prompt(unedited, tokenizer, suite.pca_prompts, reference, base_key,
                                             "last_token_states", last_token_states, config,
                                             suite.format.add_special_tokens)
    return locality_reference, unedited_rows, unedited_logprobs, unedited_states

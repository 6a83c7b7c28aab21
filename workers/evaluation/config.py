"""What an evaluation produces (``MetricRow``) and how it is configured (``EvalConfig``, YAML-loadable)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workers.evaluation.intervals import mean_interval
from workers.fields import FieldError, bounded, check_fields

EDIT_METRIC_FAMILIES = ("toolkit", "counterfact", "generative")
PROMPT_FORMATS = ("raw", "chat")
SAMPLE_ORDERS = ("seeded", "first")
COMPUTE_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Example:
    """One scored example behind a ``MetricRow``: its ``value`` and what identifies it across arms.

    ``example_id`` is the key two arms are paired on (the same id = the same example): the request's
    ``case_id`` for editing metrics, the data-set index for task examples, the token offset for a
    WikiText window, ``<task>/<data-set index>`` for a drift prompt. The other fields say what it is:
    ``case_id`` and ``prompt_kind`` (``edit``, ``rephrase``: the mean over a request's rephrase
    prompts, ``locality``: the mean over its locality prompts) for editing metrics; ``example_index``,
    the index in the data set's order; for a WikiText window its ``window_start`` (token offset in
    the text), ``window_tokens`` (tokens scored) and ``window_nll`` (their summed NLL), so perplexity
    can be recomputed and paired per window."""

    example_id: str
    value: float
    case_id: str | None = None
    prompt_kind: str | None = None
    prompt_index: int | None = None
    example_index: int | None = None
    window_start: int | None = None
    window_tokens: int | None = None
    window_nll: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class MetricRow:
    """One number: ``task`` (e.g. ``nli``, ``edit/toolkit``, ``deviation/<module>``), ``metric``
    (e.g. ``accuracy_valid``), its ``value`` and how many examples it averages over; ``ci_low`` /
    ``ci_high``: its bootstrap 95% interval over those examples (``workers.evaluation.intervals``),
    None where the value is not a score over examples (norms, retention ratios).

    ``examples``: the per-example values it was computed from (``Example``), where it is a score over
    examples; empty for norms, retention ratios and PCA separability. Not part of ``as_dict`` (the
    aggregate row); ``example_dicts`` gives them."""

    task: str
    metric: str
    value: float
    n_examples: int
    ci_low: float | None = None
    ci_high: float | None = None
    examples: tuple[Example, ...] = field(default=(), compare=False, repr=False)

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ("task", "metric", "value", "n_examples", "ci_low", "ci_high")}

    def example_dicts(self) -> list[dict[str, Any]]:
        """Its examples as rows of the store's ``examples`` table (without trajectory and checkpoint)."""
        return [{"task": self.task, "metric": self.metric, **example.as_dict()} for example in self.examples]

    def __str__(self) -> str:
        return f"{self.task:28s} {self.metric:28s} {self.value:10.4f}  (n={self.n_examples})"


def mean_row(task: str, metric: str, values: list[float]) -> MetricRow:
    """The mean of ``values`` as a row, with its bootstrap 95% interval; NaN (n=0) when there is
    nothing to average."""
    if not values:
        return MetricRow(task, metric, math.nan, 0)
    low, high = mean_interval(values)
    return MetricRow(task, metric, float(sum(values) / len(values)), len(values), low, high)


def _tasks() -> dict:
    """The task registry (``workers.evaluation.tasks.TASKS``), read when a config is made: the
    records name their scorers, whose module imports this one (for ``MetricRow``)."""
    from workers.evaluation.tasks import TASKS

    return TASKS


def examples_row(task: str, metric: str, examples: list[Example]) -> MetricRow:
    """``mean_row`` of the examples' values, carrying the examples (the row equals their mean). An id
    that repeats (a data set listing one case twice) gets ``#2``, ``#3``, ... on its later occurrences,
    in order, so every example keeps a row and the ids stay keys."""
    seen: dict[str, int] = {}
    unique = []
    for example in examples:
        seen[example.example_id] = seen.get(example.example_id, 0) + 1
        count = seen[example.example_id]
        unique.append(example if count == 1 else dataclasses.replace(example, example_id=f"{example.example_id}#{count}"))
    row = mean_row(task, metric, [example.value for example in unique])
    return dataclasses.replace(row, examples=tuple(unique))


def _default_tasks() -> dict[str, int]:
    return {name: task.default_count for name, task in _tasks().items() if task.default_count}


def _default_max_new_tokens() -> dict[str, int]:
    # NLI: one token; QA: up to 20; SAMSum: up to 25 (the EAC authors' evaluation settings).
    return {name: task.max_new_tokens for name, task in _tasks().items() if task.max_new_tokens}


@dataclass
class EvalConfig:
    """How to evaluate a checkpoint.

    - ``tasks``: general-ability task -> number of examples drawn (without replacement, with ``seed``;
      0 or absent = skip). For ``wikitext`` the count is the number of perplexity windows.
    - ``edit_metrics``: which editing-metric families run: ``toolkit`` (token-level reliability /
      generalisation / locality), ``counterfact`` (ROME's efficacy / paraphrase / neighbourhood
      scores; needs ``target_true``), ``generative`` (greedy decoding begins with the target).
    - ``prompt_format``: ``raw`` (the paper's prompts as plain text) or ``chat`` (wrapped in the
      tokenizer's chat template as one user turn, answer read from the assistant turn).
    - ``generative_max_new_tokens``: tokens decoded for the generative check; None = the target's
      token count + 2.
    - ``perplexity_corpus``: the text perplexity is scored on (a name in ``workers.data.TEXT_FILES`` or a
      path). It must not be the text the editor's second moments were estimated on (``stats_corpus``,
      wikitext-valid by default): perplexity on the statistics' own text flatters retention, most for
      AlphaEdit, whose null space is estimated on it. ``allow_statistics_text: true`` lets an
      experiment do so anyway (``check_statistics_text`` refuses it otherwise).
    - ``sample_order``: ``seeded`` draws each task's examples with ``seed`` (in data-set order);
      ``first`` takes the first ``count`` examples of the data set (how the independent SAMSum
      reference of 0.117 was measured); a count at least the data set's size takes all of it (the
      paper's full SAMSum test set: ``samsum: 818``).
    - ``perplexity_window`` / ``perplexity_stride``: WikiText windows of ``window`` tokens taken every
      ``stride`` tokens; each window scores only its last ``stride`` tokens (the rest is context).
      ``stride == window``: disjoint chunks (without a BOS token, a chunk's first token is context).
    - ``drift_examples``: prompts per task (the first of each task's sample) on which the next-token
      KL divergence edited ‖ unedited is averaged; 0 turns drift off.
    - ``deviation_norms``: norms and condition numbers of each edited matrix against the original.
    - ``pca_examples``: prompts of ``pca_task`` for the Fig. 3 PCA / logistic-regression separability
      (0 = off); ``pca_folds``: cross-validation folds.
    """

    tasks: dict[str, int] = field(default_factory=_default_tasks)
    seed: int = 0
    batch_size: int = bounded(16, minimum=1)
    max_new_tokens: dict[str, int] = field(default_factory=_default_max_new_tokens)
    prompt_format: str = "raw"
    edit_metrics: tuple[str, ...] = EDIT_METRIC_FAMILIES
    generative_max_new_tokens: int | None = None
    nli_split: str = "train"
    rouge_use_stemmer: bool = True
    sample_order: str = "seeded"
    perplexity_corpus: str = "wikitext-test"
    allow_statistics_text: bool = False
    perplexity_window: int = bounded(512, minimum=1)
    perplexity_stride: int = 512
    drift_examples: int = bounded(50, minimum=0)  # a negative count would slice from the end
    deviation_norms: bool = True
    pca_task: str = "sst2"
    pca_examples: int = bounded(0, minimum=0)
    pca_folds: int = bounded(5, minimum=2)
    progress: bool = True
    # The dtype of the scoring passes' matrix products (packed_linear.py): "bfloat16" runs them in bf16
    # (AVX512-BF16) with everything else in the model's dtype; "float32" (default): the model's own dtype.
    compute_dtype: str = "float32"

    def __post_init__(self) -> None:
        self.edit_metrics = tuple(self.edit_metrics)
        self.tasks = dict(self.tasks)
        self.max_new_tokens = {**_default_max_new_tokens(), **dict(self.max_new_tokens)}
        self.validate()

    def validate(self, source: str = "EvalConfig") -> None:
        def fail(name: str, problem: str):
            raise FieldError(name, problem, source)

        try:  # every field's declared type and range (workers.fields); the checks below need more
            check_fields(self)
        except FieldError as exc:
            fail(exc.path, exc.problem)
        tasks = _tasks()
        for task, count in self.tasks.items():
            if task not in tasks:
                fail("tasks", f"unknown task {task!r}; known: {list(tasks)}")
            if not isinstance(count, int) or count < 0:
                fail("tasks", f"{task}: expected a count >= 0, got {count!r}")
        for family in self.edit_metrics:
            if family not in EDIT_METRIC_FAMILIES:
                fail("edit_metrics", f"unknown family {family!r}; known: {list(EDIT_METRIC_FAMILIES)}")
        if self.prompt_format not in PROMPT_FORMATS:
            fail("prompt_format", f"expected one of {list(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        for task, count in self.max_new_tokens.items():
            if not isinstance(count, int) or count < 1:
                fail("max_new_tokens", f"{task}: expected a positive count, got {count!r}")
        if not 1 <= self.perplexity_stride <= self.perplexity_window:
            fail("perplexity_stride", f"expected 1 <= stride <= window ({self.perplexity_window}), "
                                      f"got {self.perplexity_stride}")
        if self.sample_order not in SAMPLE_ORDERS:
            fail("sample_order", f"expected one of {list(SAMPLE_ORDERS)}, got {self.sample_order!r}")
        if not isinstance(self.perplexity_corpus, str) or not self.perplexity_corpus:
            fail("perplexity_corpus", f"expected a corpus name or a text file path, got {self.perplexity_corpus!r}")
        if self.nli_split not in ("train", "dev"):
            fail("nli_split", f"expected 'train' or 'dev', got {self.nli_split!r}")
        prompt_tasks = [name for name, task in tasks.items() if task.prompt is not None]
        if self.pca_task not in prompt_tasks:
            fail("pca_task", f"expected one of {prompt_tasks}, got {self.pca_task!r}")
        if self.pca_examples and self.pca_examples < 2 * self.pca_folds:
            fail("pca_examples", f"need at least 2 * pca_folds = {2 * self.pca_folds} prompts")
        if self.compute_dtype not in COMPUTE_DTYPES:
            fail("compute_dtype", f"expected one of {list(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.generative_max_new_tokens is not None and self.generative_max_new_tokens < 1:
            fail("generative_max_new_tokens", "expected a positive count or null")

    @property
    def products_dtype(self):
        """``compute_dtype`` as the packed layers take it: None (the model's own) or torch.bfloat16."""
        import torch

        return torch.bfloat16 if self.compute_dtype == "bfloat16" else None

    def count(self, task: str) -> int:
        return self.tasks.get(task, 0)

    def digest(self) -> str:
        """A short hash of every field that changes the task sample (``TaskSuite``) or the general-task
        scores; batch size, progress and the editing-metric fields do not."""
        fields = dataclasses.asdict(self)
        for ignored in ("batch_size", "progress", "edit_metrics", "generative_max_new_tokens",
                        "deviation_norms", "pca_folds", "allow_statistics_text"):
            fields.pop(ignored)
        if fields["compute_dtype"] == "float32":  # the default: digests from before the field stay valid
            fields.pop("compute_dtype")
        return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def from_dict(cls, values: dict, source: str = "EvalConfig") -> "EvalConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise FieldError(str(unknown[0]), f"unknown field; known: {sorted(known)}", source)
        try:
            return cls(**values)
        except FieldError as exc:
            raise exc.within(source=source) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "EvalConfig":
        from workers.yaml_files import read_yaml_file

        path = Path(path)
        values = read_yaml_file(path) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of EvalConfig fields")
        return cls.from_dict(values, source=str(path))

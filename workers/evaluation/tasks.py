"""General abilities: one registry (``TASKS``) of every general-ability task, one record each, and the
scorers the records name. NLI (RTE), SST-2, open-domain QA (NQ), SAMSum, MMLU, known facts, WikiText
perplexity; drift over every prompt task.

A ``GeneralTask`` record is all the toolkit knows of a task: the data set its examples come from
(``workers.data.DATASETS``), its prompt, its scorer, the metrics it is reported by (headline first),
their chance levels, which are 0/1 shares, which are better lower and drawn on a log axis, its
generation budget, its sample size in the default evaluation and its title in figures. The spec's
validator, ``EvalConfig``, ``TaskSuite``, the retention rows, the metrics table and the figures read
the records; adding a task is one record here (and its loader in ``workers.data``).

The paper's four tasks are scored as its authors describe (Appendix C.4), with greedy decoding:

- ``nli`` / ``sst2``: one (NLI) or two (SST-2) new tokens; the answer is the first generated word.
  ``accuracy_valid`` = correct / answers that are a label word (the paper's figure), ``accuracy_all``
  = correct / all examples, ``valid_rate`` = share of answers that are a label word. Each example
  counts exactly once. Extra signal: ``label_ll_accuracy``, the share of examples whose correct label
  word (" True"/" False", " positive"/" negative") has the higher log-likelihood after the prompt.
- ``nq``: up to 20 tokens; the answer is the first line of the generation; ``exact_match`` after
  SQuAD normalisation against any reference answer, and ``contains_answer`` (a reference answer
  occurs, as whole words, in the normalised answer).
- ``samsum``: up to 25 tokens; the whole generation (stripped) is the summary; ROUGE-1/2/L F1 from
  rouge-score and ``rouge_mean``, the per-example mean of the three averaged over examples.

Extra signals that small models need: ``mmlu`` (``accuracy_letter``: log-likelihood of " A".." D"
after the Hendrycks prompt; ``accuracy_cloze``: log-likelihood of each choice's text per character),
``known`` (``recall``: the share of ROME's known facts whose greedy continuation begins with the
fact's attribute — knowledge the edits were not aimed at), ``wikitext`` ``perplexity`` = exp(total NLL
/ scored tokens) over the sampled windows, and drift (``drift_rows``): the mean KL(edited ‖ unedited)
of the next-token distribution after task prompts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch

from workers.data import DATASETS, DataSet
from workers.evaluation.config import EvalConfig, Example, MetricRow, examples_row
from workers.evaluation.intervals import ratio_interval
from workers.evaluation.prompts import (MMLU_LETTERS, NLI_LABELS, SST2_LABELS, PromptFormat, known_fact_prompt,
                                        mmlu_cloze_prompt, mmlu_prompt, nli_prompt, qa_prompt, sst2_prompt,
                                        summary_prompt, token_count)
from workers.evaluation.scoring import EncodedPair, score_continuations, score_encoded
from workers.evaluation.text_metrics import (ROUGE_TYPES, begins_with_answer, contains_answer, exact_match,
                                             first_line, first_word, rouge_f1)
from workers.generation import greedy_continuations

if TYPE_CHECKING:  # the suite is built from these records (workers.evaluation.suite)
    from workers.evaluation.suite import TaskSuite


def _generate(model, tokenizer, prompts: list[str], fmt: PromptFormat, max_new_tokens: int, config: EvalConfig):
    return greedy_continuations(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                batch_size=config.batch_size, add_special_tokens=fmt.add_special_tokens,
                                sort_by_length=True, progress=config.progress)


def label_loglik_choices(model, tokenizer, prompts: Sequence[str], options: Sequence[Sequence[str]],
                         fmt: PromptFormat, config: EvalConfig, *, per_character: bool = False) -> list[int]:
    """For each prompt, the index of the option whose tokens are most likely after it (sum of token
    log-probabilities; divided by the option's character count when ``per_character``)."""
    pairs = [(prompt, fmt.answer_prefix + option) for prompt, opts in zip(prompts, options) for option in opts]
    scores = score_continuations(model, tokenizer, pairs, batch_size=config.batch_size,
                                 add_special_tokens=fmt.add_special_tokens, progress=config.progress,
                                 desc="label log-likelihood")
    choices, position = [], 0
    for opts in options:
        values = [s.total_logprob / (len(o) if per_character else 1)
                  for s, o in zip(scores[position:position + len(opts)], opts)]
        choices.append(max(range(len(opts)), key=values.__getitem__))
        position += len(opts)
    return choices


def example_ids(suite: TaskSuite, task: str) -> list[int]:
    """Each sampled example's index in the data set (its position in the sample for a suite built
    without them)."""
    return suite.indices.get(task) or list(range(len(suite.examples[task])))


def task_examples(ids: Sequence[int], values: Sequence[float]) -> list[Example]:
    """Per-example values of a task, keyed by data-set index."""
    return [Example(str(index), float(value), example_index=int(index)) for index, value in zip(ids, values)]


def classification_rows(task: str, model, tokenizer, prompts: list[str], gold: Sequence[int],
                        labels: Sequence[str], fmt: PromptFormat, config: EvalConfig,
                        ids: Sequence[int] | None = None) -> list[MetricRow]:
    """Generated-answer accuracy (over valid answers and over all) and label log-likelihood accuracy;
    ``ids``: the examples' data-set indices (default: their positions)."""
    ids = list(ids) if ids is not None else list(range(len(prompts)))
    texts = _generate(model, tokenizer, prompts, fmt, config.max_new_tokens[task], config)
    words = [label.lower() for label in labels]
    answers = [first_word(text) for text in texts]
    valid = [answer in words for answer in answers]
    correct = [answer == words[g] for answer, g in zip(answers, gold)]
    chosen = label_loglik_choices(model, tokenizer, prompts, [labels] * len(prompts), fmt, config)
    # A correct answer is a valid one, so accuracy over valid answers is the mean over those examples.
    answered = [(index, ok) for index, ok, is_valid in zip(ids, correct, valid) if is_valid]
    return [
        examples_row(task, "accuracy_valid", task_examples([i for i, _ in answered], [ok for _, ok in answered])),
        examples_row(task, "accuracy_all", task_examples(ids, correct)),
        examples_row(task, "valid_rate", task_examples(ids, valid)),
        examples_row(task, "label_ll_accuracy", task_examples(ids, [c == g for c, g in zip(chosen, gold)])),
    ]


def nli_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    gold = [0 if x.entailment else 1 for x in suite.examples["nli"]]
    return classification_rows("nli", model, tokenizer, suite.prompts["nli"], gold, NLI_LABELS, suite.format, config,
                               example_ids(suite, "nli"))


def sst2_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    gold = [0 if x.positive else 1 for x in suite.examples["sst2"]]
    return classification_rows("sst2", model, tokenizer, suite.prompts["sst2"], gold, SST2_LABELS, suite.format,
                               config, example_ids(suite, "sst2"))


def qa_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    texts = _generate(model, tokenizer, suite.prompts["nq"], suite.format, config.max_new_tokens["nq"], config)
    answers = [first_line(text) for text in texts]
    references = [x.answers for x in suite.examples["nq"]]
    ids = example_ids(suite, "nq")
    return [examples_row("nq", "exact_match", task_examples(ids, [exact_match(a, r) for a, r in zip(answers, references)])),
            examples_row("nq", "contains_answer",
                         task_examples(ids, [contains_answer(a, r) for a, r in zip(answers, references)]))]


def summarisation_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    texts = _generate(model, tokenizer, suite.prompts["samsum"], suite.format, config.max_new_tokens["samsum"],
                      config)
    scores = rouge_f1([text.strip() for text in texts], [x.summary for x in suite.examples["samsum"]],
                      use_stemmer=config.rouge_use_stemmer)
    ids = example_ids(suite, "samsum")
    rows = [examples_row("samsum", name, task_examples(ids, [s[name] for s in scores])) for name in ROUGE_TYPES]
    return rows + [examples_row("samsum", "rouge_mean", task_examples(ids, [sum(s.values()) / len(s) for s in scores]))]


def mmlu_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    examples = suite.examples["mmlu"]
    gold = [x.answer for x in examples]
    letters = label_loglik_choices(model, tokenizer, suite.prompts["mmlu"], [MMLU_LETTERS] * len(examples),
                                   suite.format, config)
    cloze_prompts = [suite.format.render(tokenizer, mmlu_cloze_prompt(x)) for x in examples]
    cloze = label_loglik_choices(model, tokenizer, cloze_prompts, [x.choices for x in examples], suite.format,
                                 config, per_character=True)
    ids = example_ids(suite, "mmlu")
    return [examples_row("mmlu", "accuracy_letter", task_examples(ids, [c == g for c, g in zip(letters, gold)])),
            examples_row("mmlu", "accuracy_cloze", task_examples(ids, [c == g for c, g in zip(cloze, gold)]))]


def mmlu_cloze_fits(tokenizer, fmt: PromptFormat, example, context_length: int) -> bool:
    """The cloze form (``mmlu_rows``) with its longest choice fits the model's context too."""
    cloze = fmt.render(tokenizer, mmlu_cloze_prompt(example))
    longest_choice = max(token_count(tokenizer, fmt, fmt.answer_prefix + c) for c in example.choices)
    return token_count(tokenizer, fmt, cloze) + longest_choice <= context_length


def known_fact_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    """``recall``: the share of known facts whose greedy continuation (its first line) begins with the
    fact's attribute, after SQuAD normalisation."""
    texts = _generate(model, tokenizer, suite.prompts["known"], suite.format, config.max_new_tokens["known"],
                      config)
    attributes = [x.attribute for x in suite.examples["known"]]
    return [examples_row("known", "recall", task_examples(example_ids(suite, "known"), [
        begins_with_answer(first_line(text), attribute) for text, attribute in zip(texts, attributes)]))]


def window_nlls(model, tokenizer, windows: Sequence[EncodedPair], *, batch_size: int = 16,
                progress: bool = False) -> tuple[list[float], list[int]]:
    """Per window: the total NLL of its scored tokens, and their count."""
    scores = score_encoded(model, tokenizer, windows, batch_size=batch_size, progress=progress, desc="perplexity")
    return [-s.logprobs.double().sum().item() for s in scores], [len(s.logprobs) for s in scores]


def perplexity(model, tokenizer, windows: Sequence[EncodedPair], *, batch_size: int = 16,
               progress: bool = False) -> tuple[float, int]:
    """exp(total NLL / number of scored tokens) over ``windows``, and that token count."""
    nlls, tokens = window_nlls(model, tokenizer, windows, batch_size=batch_size, progress=progress)
    return math.exp(sum(nlls) / sum(tokens)), sum(tokens)


def perplexity_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    """Perplexity over the windows, its interval from resampling whole windows (``ratio_interval``).

    Perplexity is exp(Σ NLL / Σ tokens), a ratio of sums over windows, not a mean of per-window
    values: each window's example carries its start offset, token count and summed NLL (its
    ``value`` is its own mean NLL per token), from which the row is recomputed and arms are paired."""
    nlls, tokens = window_nlls(model, tokenizer, suite.perplexity_windows, batch_size=config.batch_size,
                               progress=config.progress)
    low, high = ratio_interval(nlls, tokens, transform=np.exp)
    starts = suite.perplexity_starts or list(range(len(nlls)))
    windows = tuple(Example(str(start), nll / count, window_start=int(start), window_tokens=int(count),
                            window_nll=float(nll))
                    for start, nll, count in zip(starts, nlls, tokens))
    return [MetricRow("wikitext", "perplexity", math.exp(sum(nlls) / sum(tokens)), len(nlls), low, high, windows)]


@dataclass(frozen=True)
class GeneralTask:
    """One general-ability task, everything about it in one record (see the module docstring).

    ``score(model, tokenizer, suite, config)`` returns the task's rows (one ``MetricRow`` per metric,
    each the mean of per-example values). ``prompt`` builds an example's prompt (None: the task has
    no prompts, i.e. perplexity over text windows). ``answers``: the label words scored after the
    prompt, counted with ``max_new_tokens`` (the default generation budget) when checking that an
    example fits the model's context; ``fits``: a further check for the other prompts the scorer
    builds. ``chance``: metric -> the score of guessing (retention is measured on the margin above
    it). ``binary``: metrics that are a share of 0/1 outcomes. ``default_count``: examples in the
    default evaluation (0: only when a spec or config asks)."""

    name: str
    title: str
    dataset: str  # the ``workers.data.DATASETS`` entry its examples (or text) come from
    score: Callable[..., list[MetricRow]]
    metrics: tuple[str, ...]  # reported and plotted, headline first
    prompt: Callable[[Any], str] | None = None
    answers: tuple[str, ...] = ()
    max_new_tokens: int = 0
    chance: Mapping[str, float] = field(default_factory=dict)
    binary: frozenset[str] = frozenset()
    lower_is_better: frozenset[str] = frozenset()
    log_scale: frozenset[str] = frozenset()  # metrics drawn on a log axis
    default_count: int = 0
    fits: Callable[..., bool] | None = None
    # The data set per configuration where one setting chooses it (NLI: ``nli_split``); else ``dataset``.
    dataset_for: Callable[[EvalConfig], str] | None = None

    def data_set(self, config: EvalConfig) -> DataSet:
        return DATASETS[self.dataset_for(config) if self.dataset_for else self.dataset]


CLASSIFICATION_SHARES = frozenset({"accuracy_valid", "accuracy_all", "valid_rate", "label_ll_accuracy"})
PERPLEXITY_TASK = "wikitext"  # the task scored on text windows (``TaskSuite.perplexity_windows``)

TASKS: dict[str, GeneralTask] = {task.name: task for task in (
    GeneralTask("nli", "NLI (RTE)", "rte", nli_rows, ("accuracy_all", "label_ll_accuracy"), prompt=nli_prompt,
                answers=NLI_LABELS, max_new_tokens=1, chance={"accuracy_valid": 0.5, "label_ll_accuracy": 0.5},
                binary=CLASSIFICATION_SHARES, default_count=100,
                dataset_for=lambda config: "rte-dev" if config.nli_split == "dev" else "rte"),
    # Two new tokens, so that a label split in two tokens (e.g. after a chat template) is still read.
    GeneralTask("sst2", "Sentiment (SST-2)", "sst2", sst2_rows, ("accuracy_all", "label_ll_accuracy"),
                prompt=sst2_prompt, answers=SST2_LABELS, max_new_tokens=2,
                chance={"accuracy_valid": 0.5, "label_ll_accuracy": 0.5}, binary=CLASSIFICATION_SHARES,
                default_count=100),
    GeneralTask("nq", "Open-domain QA (NQ)", "nq", qa_rows, ("exact_match", "contains_answer"), prompt=qa_prompt,
                max_new_tokens=20, binary=frozenset({"exact_match", "contains_answer"}), default_count=100),
    GeneralTask("samsum", "Summarisation (SAMSum)", "samsum", summarisation_rows, ("rouge_mean",),
                prompt=summary_prompt, max_new_tokens=25, default_count=100),
    GeneralTask("mmlu", "MMLU", "mmlu", mmlu_rows, ("accuracy_letter", "accuracy_cloze"), prompt=mmlu_prompt,
                answers=MMLU_LETTERS, chance={"accuracy_letter": 0.25, "accuracy_cloze": 0.25},
                binary=frozenset({"accuracy_letter", "accuracy_cloze"}), default_count=100, fits=mmlu_cloze_fits),
    # Perplexity is exp(loss): one collapsing arm on a linear axis flattens every other into the bottom line.
    GeneralTask(PERPLEXITY_TASK, "WikiText perplexity", "wikitext-test", perplexity_rows, ("perplexity",),
                lower_is_better=frozenset({"perplexity"}), log_scale=frozenset({"perplexity"}), default_count=20),
    GeneralTask("known", "Known facts (ROME)", "known", known_fact_rows, ("recall",), prompt=known_fact_prompt,
                max_new_tokens=8, binary=frozenset({"recall"})),
)}
PROMPT_TASKS = tuple(name for name, task in TASKS.items() if task.prompt is not None)  # drift is measured on these


def general_task_rows(model, tokenizer, suite: TaskSuite, config: EvalConfig) -> list[MetricRow]:
    """Every configured general-ability task's rows for ``model`` as it is now."""
    rows: list[MetricRow] = []
    for name, task in TASKS.items():
        if config.count(name):
            rows += task.score(model, tokenizer, suite, config)
    return rows


# ---- drift: KL divergence of the next-token distribution, edited ‖ unedited -------------------------


def drift_prompts(suite: TaskSuite, config: EvalConfig) -> dict[str, list[str]]:
    """The first ``drift_examples`` prompts of each sampled prompt task."""
    return {task: suite.prompts[task][:config.drift_examples] for task in PROMPT_TASKS
            if task in suite.prompts and config.drift_examples}


def kl_divergence(logprobs_p: torch.Tensor, logprobs_q: torch.Tensor) -> torch.Tensor:
    """KL(P ‖ Q) = Σ_x P(x) (log P(x) − log Q(x)) per row, from log-probabilities (float32)."""
    return (logprobs_p.exp() * (logprobs_p - logprobs_q)).sum(dim=-1)


def drift_rows(edited_logprobs: dict[str, torch.Tensor], unedited_logprobs: dict[str, torch.Tensor],
               ids: dict[str, Sequence[int]] | None = None) -> list[MetricRow]:
    """Per task ``drift_kl`` and over all prompts ``drift/kl_mean``; each prompt's example is keyed
    ``<task>/<data-set index>`` (``ids``: per task, the prompts' data-set indices; default: positions)."""
    rows, everything = [], []
    for task, edited in edited_logprobs.items():
        values = kl_divergence(edited, unedited_logprobs[task]).tolist()
        indices = list((ids or {}).get(task) or range(len(values)))[:len(values)]
        examples = [Example(f"{task}/{index}", value, prompt_kind=task, example_index=int(index))
                    for index, value in zip(indices, values)]
        everything += examples
        rows.append(examples_row(task, "drift_kl", examples))
    return rows + [examples_row("drift", "kl_mean", everything)] if everything else rows

"""The sampled examples of one evaluation: ``TaskSuite`` holds, for one evaluation configuration and
one tokenizer, the sampled examples of every configured task (``workers.evaluation.tasks.TASKS``),
their rendered prompts and the WikiText perplexity windows."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from workers.evaluation.config import EvalConfig
from workers.evaluation.prompts import (PromptFormat, sample_indices, fitting_indices, perplexity_window_starts,
                                        perplexity_windows, special_prefix, token_count)
from workers.evaluation.scoring import EncodedPair
from workers.evaluation.tasks import PERPLEXITY_TASK, TASKS, GeneralTask
from workers.stats import load_corpus

logger = logging.getLogger(__name__)


def context_fit(tokenizer, fmt: PromptFormat, task: GeneralTask, config: EvalConfig, context_length: int):
    """A predicate: does one example of ``task`` — its prompt plus what follows it (the generated
    tokens, or the longest scored answer word) and whatever else the task scores (``task.fits``) —
    fit in ``context_length`` positions? The task's fixed answer budget is counted once, here."""
    label_tokens = max((token_count(tokenizer, fmt, fmt.answer_prefix + a) for a in task.answers), default=0)
    answer_budget = max(config.max_new_tokens.get(task.name, 0), label_tokens)

    def fits(example) -> bool:
        prompt = fmt.render(tokenizer, task.prompt(example))
        if token_count(tokenizer, fmt, prompt) + answer_budget > context_length:
            return False
        return task.fits is None or task.fits(tokenizer, fmt, example, context_length)

    return fits


@dataclass
class TaskSuite:
    """Sampled examples and rendered prompts of each configured task, for one tokenizer."""

    format: PromptFormat
    examples: dict[str, list] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    perplexity_windows: list[EncodedPair] = field(default_factory=list)
    pca_prompts: list[str] = field(default_factory=list)
    # Per task, each sampled example's index in the data set (the ``examples`` table's id); per
    # perplexity window, the token offset of its first scored token in the text.
    indices: dict[str, list[int]] = field(default_factory=dict)
    perplexity_starts: list[int] = field(default_factory=list)

    # Examples of each task passed over because their prompt and answer exceed the model's context.
    excluded: dict[str, int] = field(default_factory=dict)

    @classmethod
    def build(cls, tokenizer, config: EvalConfig, examples: dict[str, list], *, wikitext: str | None = None,
              pca_examples: Sequence | None = None, context_length: int | None = None) -> "TaskSuite":
        """From already loaded examples (sampled here) and, for perplexity, the raw text.

        With ``context_length`` (the model's, in tokens), only examples whose prompt plus the tokens
        the task needs after it fit are sampled (see ``sample_fitting``); the count passed over is in
        ``excluded`` and logged. A task none of whose examples fits is an error naming the task.
        """
        fmt = PromptFormat(config.prompt_format)
        suite = cls(fmt)

        def sample(name: str, pool: Sequence, count: int, sample_key: str) -> list[int]:
            """The data-set indices of the task's sample."""
            task = TASKS.get(name)
            if task is None or task.prompt is None:
                raise ValueError(f"no prompt for task {name!r}; known: {sorted(n for n, t in TASKS.items() if t.prompt)}")
            if context_length is None:
                return sample_indices(len(pool), count, config.seed, sample_key, config.sample_order)
            fits = context_fit(tokenizer, fmt, task, config, context_length)
            chosen, passed_over = fitting_indices(pool, count, config.seed, sample_key, fits, config.sample_order)
            if count and pool and not chosen:
                raise ValueError(f"task {name!r}: none of its {len(pool)} examples fits the model's context of "
                                 f"{context_length} tokens (prompt plus answer); lower the task's count to 0")
            if passed_over:
                suite.excluded[sample_key] = passed_over
                logger.warning("task %s: %d example(s) passed over because they exceed the model's context of "
                               "%d tokens; %d sampled", name, passed_over, context_length, len(chosen))
            return chosen

        for name, pool in examples.items():
            suite.indices[name] = sample(name, pool, config.count(name), name)
            chosen = [pool[i] for i in suite.indices[name]]
            suite.examples[name] = chosen
            suite.prompts[name] = [fmt.render(tokenizer, TASKS[name].prompt(x)) for x in chosen]
        if config.count(PERPLEXITY_TASK):
            if wikitext is None:
                raise ValueError(f"tasks.{PERPLEXITY_TASK} is set but no WikiText was given")
            if context_length is not None and config.perplexity_window > context_length:
                raise ValueError(f"perplexity_window {config.perplexity_window} exceeds the model's context of "
                                 f"{context_length} tokens")
            ids = tokenizer(wikitext, add_special_tokens=False, verbose=False)["input_ids"]
            suite.perplexity_windows = perplexity_windows(
                ids, window=config.perplexity_window, stride=config.perplexity_stride,
                count=config.count(PERPLEXITY_TASK), seed=config.seed, prefix=special_prefix(tokenizer))
            suite.perplexity_starts = perplexity_window_starts(len(ids), stride=config.perplexity_stride,
                                                               count=config.count(PERPLEXITY_TASK), seed=config.seed)
        if config.pca_examples and pca_examples is not None:
            chosen = [pca_examples[i] for i in sample(config.pca_task, pca_examples, config.pca_examples,
                                                      f"pca-{config.pca_task}")]
            suite.pca_prompts = [fmt.render(tokenizer, TASKS[config.pca_task].prompt(x)) for x in chosen]
        return suite

    @classmethod
    def load(cls, tokenizer, config: EvalConfig, data_root: str | Path | None = None, *,
             context_length: int | None = None) -> "TaskSuite":
        """Load the configured tasks from the data directory (each task's data set, from its record)
        and sample them (``build``)."""
        def load(name: str) -> list:
            return TASKS[name].data_set(config).load(data_root)

        pools = {name: load(name) for name, task in TASKS.items() if task.prompt and config.count(name)}
        wikitext = load_corpus(config.perplexity_corpus, data_root) if config.count(PERPLEXITY_TASK) else None
        pca_pool = None
        if config.pca_examples:
            pca_pool = pools.get(config.pca_task) or load(config.pca_task)
        return cls.build(tokenizer, config, pools, wikitext=wikitext, pca_examples=pca_pool,
                         context_length=context_length)

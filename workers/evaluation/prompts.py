"""General-ability task prompts (the EAC paper's Table 4) and the sampled examples they are filled with.

``TaskSuite`` holds, for one evaluation configuration, the sampled examples of every task, their
rendered prompts and the WikiText perplexity windows. Examples are drawn without replacement with a
seeded generator per task, so each example is counted exactly once and the same seed gives the same
sample on every machine. Prompts are rendered ``raw`` (the paper's plain text) or through the
tokenizer's chat template (one user turn; the model answers in the assistant turn).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from workers import data
from workers.evaluation.config import EvalConfig
from workers.evaluation.scoring import EncodedPair
from workers.sampling import seeded_order, seeded_sample
from workers.stats import load_corpus

logger = logging.getLogger(__name__)

# The EAC authors' prompts (paper Table 4 and their evaluation scripts), greedy decoding.
NLI_PROMPT = "{sentence1} entails the {sentence2}. True or False? answer:"
SST2_PROMPT = ("For each snippet of text, label the sentiment of the text as positive or negative. "
               "The answer should be exact 'positive' or 'negative'. text: {text} answer:")
QA_PROMPT = "Refer to the passage below and answer the following question. Passage: {passage} Question: {question}"
SUMMARY_PROMPT = "{dialogue}\nTL;DR:"
# MMLU is our extra signal: the zero-shot format of Hendrycks et al. (2021), scored by the
# log-likelihood of the answer letter, and a cloze form scored by the log-likelihood of each choice.
MMLU_PROMPT = ("The following are multiple choice questions (with answers) about {subject}.\n\n"
               "{question}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:")
MMLU_CLOZE_PROMPT = "The following are questions about {subject}.\n\nQuestion: {question}\nAnswer:"

NLI_LABELS = ("True", "False")  # index 0: entailment
SST2_LABELS = ("positive", "negative")  # index 0: positive
MMLU_LETTERS = ("A", "B", "C", "D")


@dataclass(frozen=True)
class PromptFormat:
    """``raw``: the prompt as plain text (tokenised with the tokenizer's special tokens, e.g. BOS).
    ``chat``: the prompt as one user turn of the tokenizer's chat template, which carries its own
    special tokens; the answer starts the assistant turn, so label words follow without a space."""

    style: str = "raw"

    def render(self, tokenizer, prompt: str) -> str:
        if self.style == "raw":
            return prompt
        if self.style == "chat":
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"prompt_format 'chat': the tokenizer {tokenizer.name_or_path!r} has no chat template")
            return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
        raise ValueError(f"unknown prompt format {self.style!r}; known: ['raw', 'chat']")

    @property
    def add_special_tokens(self) -> bool:
        return self.style == "raw"

    @property
    def answer_prefix(self) -> str:
        return " " if self.style == "raw" else ""


def _sample_indices(size: int, count: int, seed: int, task: str, order: str = "seeded") -> list[int]:
    """``min(count, size)`` distinct indices, sorted: drawn with a generator seeded by ``(seed, task)``
    (``order="seeded"``), or the first ones (``order="first"``)."""
    if order == "first":
        return list(range(min(count, size)))
    return seeded_sample(size, count, f"{seed}:{task}")


def sample_examples(examples: Sequence, count: int, seed: int, task: str, order: str = "seeded") -> list:
    """``count`` distinct examples (all of them if there are fewer), drawn with a generator seeded by
    ``(seed, task)`` — or the first ``count`` with ``order="first"`` — in data-set order."""
    return [examples[i] for i in _sample_indices(len(examples), count, seed, task, order)]


def sample_fitting(examples: Sequence, count: int, seed: int, task: str, fits,
                   order: str = "seeded") -> tuple[list, int]:
    """Like ``sample_examples``, but only examples for which ``fits(example)`` holds (their prompt and
    answer fit the model's context). Returns the sample and how many drawn examples were passed over.

    The usual sample is drawn first, so a model whose context holds every prompt sees exactly the
    examples ``sample_examples`` gives; examples that do not fit are replaced by further examples
    from the rest of the pool (in a seeded order, or in data-set order with ``order="first"``),
    until ``count`` fit or the pool is exhausted.
    """
    first = _sample_indices(len(examples), count, seed, task, order)
    kept = [i for i in first if fits(examples[i])]
    passed_over = len(first) - len(kept)
    if len(kept) < len(first):
        drawn = set(first)
        rest = [i for i in range(len(examples)) if i not in drawn]
        if order != "first":
            rest = [rest[j] for j in seeded_order(len(rest), f"{seed}:{task}:refill")]
        for index in rest:
            if len(kept) >= count:
                break
            if fits(examples[index]):
                kept.append(index)
            else:
                passed_over += 1
    return [examples[i] for i in sorted(kept)], passed_over


def nli_prompt(example: data.NLIExample) -> str:
    return NLI_PROMPT.format(sentence1=example.premise, sentence2=example.hypothesis)


def sst2_prompt(example: data.SentimentExample) -> str:
    return SST2_PROMPT.format(text=example.text)


def qa_prompt(example: data.QAExample) -> str:
    return QA_PROMPT.format(passage=example.passage, question=example.question)


def summary_prompt(example: data.SummaryExample) -> str:
    return SUMMARY_PROMPT.format(dialogue=example.dialogue)


def _subject(example: data.MultipleChoiceExample) -> str:
    return example.subject.replace("_", " ") or "general knowledge"


def mmlu_prompt(example: data.MultipleChoiceExample) -> str:
    a, b, c, d = example.choices
    return MMLU_PROMPT.format(subject=_subject(example), question=example.question, a=a, b=b, c=c, d=d)


def mmlu_cloze_prompt(example: data.MultipleChoiceExample) -> str:
    return MMLU_CLOZE_PROMPT.format(subject=_subject(example), question=example.question)


PROMPT_BUILDERS = {"nli": nli_prompt, "sst2": sst2_prompt, "nq": qa_prompt, "samsum": summary_prompt,
                   "mmlu": mmlu_prompt}


def special_prefix(tokenizer) -> tuple[int, ...]:
    """The tokens the tokenizer puts before any text (a BOS token, or nothing)."""
    with_specials = tokenizer("x")["input_ids"]
    bare = tokenizer("x", add_special_tokens=False)["input_ids"]
    if with_specials[len(with_specials) - len(bare):] != bare:
        raise ValueError("the tokenizer adds special tokens after the text; perplexity windows cannot be built")
    return tuple(with_specials[:len(with_specials) - len(bare)])


def perplexity_windows(token_ids: Sequence[int], *, window: int, stride: int, count: int, seed: int,
                       prefix: Sequence[int] = ()) -> list[EncodedPair]:
    """``count`` windows (drawn with ``seed``) over a token stream, as (context, scored tokens) pairs.

    Window k scores tokens [k·stride, (k+1)·stride) given the ``window - stride`` tokens before them
    (fewer at the start of the stream), after ``prefix`` (the tokenizer's BOS, if it uses one). Only
    complete windows are used. A window left with nothing before its tokens (no prefix and no
    context: disjoint chunks, or the stream's start) uses its first token as context, unscored.
    """
    context = window - stride
    starts = list(range(0, len(token_ids) - stride + 1, stride))
    chosen = [starts[i] for i in seeded_sample(len(starts), count, f"{seed}:wikitext")]  # starts ascend
    pairs = []
    for start in chosen:
        history = list(prefix) + list(token_ids[max(0, start - context):start])
        scored = list(token_ids[start:start + stride])
        if not history:
            history, scored = scored[:1], scored[1:]
        pairs.append(EncodedPair(tuple(history), tuple(scored)))
    return pairs


def _token_count(tokenizer, fmt: PromptFormat, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=fmt.add_special_tokens, verbose=False)["input_ids"])


def context_fit(tokenizer, fmt: PromptFormat, task: str, config: EvalConfig, context_length: int):
    """A predicate: does one example of ``task`` — its prompt plus what follows it (the generated
    tokens, or the longest scored answer: label word, MMLU letter or, for the cloze form, choice) —
    fit in ``context_length`` positions? The task's fixed answer budget is counted once, here."""
    labels = {"nli": NLI_LABELS, "sst2": SST2_LABELS, "mmlu": MMLU_LETTERS}.get(task, ())
    label_tokens = max((_token_count(tokenizer, fmt, fmt.answer_prefix + a) for a in labels), default=0)
    answer_budget = max(config.max_new_tokens.get(task, 0), label_tokens)

    def fits(example) -> bool:
        prompt = fmt.render(tokenizer, PROMPT_BUILDERS[task](example))
        if _token_count(tokenizer, fmt, prompt) + answer_budget > context_length:
            return False
        if task == "mmlu":
            cloze = fmt.render(tokenizer, mmlu_cloze_prompt(example))
            longest_choice = max(_token_count(tokenizer, fmt, fmt.answer_prefix + c) for c in example.choices)
            return _token_count(tokenizer, fmt, cloze) + longest_choice <= context_length
        return True

    return fits


@dataclass
class TaskSuite:
    """Sampled examples and rendered prompts of each configured task, for one tokenizer."""

    format: PromptFormat
    examples: dict[str, list] = field(default_factory=dict)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    perplexity_windows: list[EncodedPair] = field(default_factory=list)
    pca_prompts: list[str] = field(default_factory=list)

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

        def sample(task: str, pool: Sequence, count: int, sample_key: str) -> list:
            if task not in PROMPT_BUILDERS:
                raise ValueError(f"no prompt for task {task!r}; known: {sorted(PROMPT_BUILDERS)}")
            if context_length is None:
                return sample_examples(pool, count, config.seed, sample_key, config.sample_order)
            fits = context_fit(tokenizer, fmt, task, config, context_length)
            chosen, passed_over = sample_fitting(pool, count, config.seed, sample_key, fits, config.sample_order)
            if count and pool and not chosen:
                raise ValueError(f"task {task!r}: none of its {len(pool)} examples fits the model's context of "
                                 f"{context_length} tokens (prompt plus answer); lower the task's count to 0")
            if passed_over:
                suite.excluded[sample_key] = passed_over
                logger.warning("task %s: %d example(s) passed over because they exceed the model's context of "
                               "%d tokens; %d sampled", task, passed_over, context_length, len(chosen))
            return chosen

        for task, pool in examples.items():
            chosen = sample(task, pool, config.count(task), task)
            suite.examples[task] = chosen
            suite.prompts[task] = [fmt.render(tokenizer, PROMPT_BUILDERS[task](x)) for x in chosen]
        if config.count("wikitext"):
            if wikitext is None:
                raise ValueError("tasks.wikitext is set but no WikiText was given")
            if context_length is not None and config.perplexity_window > context_length:
                raise ValueError(f"perplexity_window {config.perplexity_window} exceeds the model's context of "
                                 f"{context_length} tokens")
            ids = tokenizer(wikitext, add_special_tokens=False, verbose=False)["input_ids"]
            suite.perplexity_windows = perplexity_windows(
                ids, window=config.perplexity_window, stride=config.perplexity_stride,
                count=config.count("wikitext"), seed=config.seed, prefix=special_prefix(tokenizer))
        if config.pca_examples and pca_examples is not None:
            chosen = sample(config.pca_task, pca_examples, config.pca_examples, f"pca-{config.pca_task}")
            suite.pca_prompts = [fmt.render(tokenizer, PROMPT_BUILDERS[config.pca_task](x)) for x in chosen]
        return suite

    @classmethod
    def load(cls, tokenizer, config: EvalConfig, data_root: str | Path | None = None, *,
             context_length: int | None = None) -> "TaskSuite":
        """Load the configured tasks from the data directory and sample them (``build``)."""
        def load(task: str) -> list:
            return data.task_dataset(task, config.nli_split).load(data_root)

        pools = {task: load(task) for task in PROMPT_BUILDERS if config.count(task)}
        wikitext = load_corpus(config.perplexity_corpus, data_root) if config.count("wikitext") else None
        pca_pool = None
        if config.pca_examples:
            pca_pool = pools.get(config.pca_task) or load(config.pca_task)
        return cls.build(tokenizer, config, pools, wikitext=wikitext, pca_examples=pca_pool,
                         context_length=context_length)


def check_statistics_text(config: EvalConfig, stats_corpus: str | None, data_root: str | Path | None = None) -> None:
    """Refuse to score perplexity on the text an editor's second moments were estimated on
    (``stats_corpus``; None for editors without statistics), unless ``config.allow_statistics_text``.

    The texts are compared by name and, where both can be read, by content (a path may name the file
    a corpus name stands for). A text that cannot be read is compared by name only: loading it
    fails later, with its own error.
    """
    if stats_corpus is None or not config.count("wikitext") or config.allow_statistics_text:
        return
    same = stats_corpus == config.perplexity_corpus
    if not same:
        try:
            same = load_corpus(stats_corpus, data_root) == load_corpus(config.perplexity_corpus, data_root)
        except (OSError, ValueError):
            same = False
    if same:
        raise ValueError(f"field 'perplexity_corpus': {config.perplexity_corpus!r} is the text the second moments "
                         f"are estimated on (stats_corpus {stats_corpus!r}), which flatters perplexity retention; "
                         "score another text, estimate on another, or set allow_statistics_text: true")

"""General-ability task prompts (the EAC paper's Table 4), the formats they are rendered in, and how
examples are sampled.

Examples are drawn without replacement with a seeded generator per task, so each example is counted
exactly once and the same seed gives the same sample on every machine. Prompts are rendered ``raw``
(the paper's plain text) or through the tokenizer's chat template (one user turn; the model answers in
the assistant turn). Which task uses which prompt is the task's record (``workers.evaluation.tasks``);
the sampled suite of one evaluation is ``workers.evaluation.suite.TaskSuite``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from workers import data
from workers.evaluation.config import EvalConfig
from workers.evaluation.scoring import EncodedPair
from workers.sampling import seeded_order, seeded_sample
from workers.stats import load_corpus

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


def sample_indices(size: int, count: int, seed: int, task: str, order: str = "seeded") -> list[int]:
    """``min(count, size)`` distinct indices, sorted: drawn with a generator seeded by ``(seed, task)``
    (``order="seeded"``), or the first ones (``order="first"``)."""
    if order == "first":
        return list(range(min(count, size)))
    return seeded_sample(size, count, f"{seed}:{task}")


def sample_examples(examples: Sequence, count: int, seed: int, task: str, order: str = "seeded") -> list:
    """``count`` distinct examples (all of them if there are fewer), drawn with a generator seeded by
    ``(seed, task)`` — or the first ``count`` with ``order="first"`` — in data-set order."""
    return [examples[i] for i in sample_indices(len(examples), count, seed, task, order)]


def sample_fitting(examples: Sequence, count: int, seed: int, task: str, fits,
                   order: str = "seeded") -> tuple[list, int]:
    """Like ``sample_examples``, but only examples for which ``fits(example)`` holds (their prompt and
    answer fit the model's context). Returns the sample and how many drawn examples were passed over
    (``fitting_indices`` gives the sample's indices in the data set)."""
    indices, passed_over = fitting_indices(examples, count, seed, task, fits, order)
    return [examples[i] for i in indices], passed_over


def fitting_indices(examples: Sequence, count: int, seed: int, task: str, fits,
                    order: str = "seeded") -> tuple[list[int], int]:
    """The data-set indices (ascending) of ``sample_fitting``'s sample, and how many were passed over.

    The usual sample is drawn first, so a model whose context holds every prompt sees exactly the
    examples ``sample_examples`` gives; examples that do not fit are replaced by further examples
    from the rest of the pool (in a seeded order, or in data-set order with ``order="first"``),
    until ``count`` fit or the pool is exhausted.
    """
    first = sample_indices(len(examples), count, seed, task, order)
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
    return sorted(kept), passed_over


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


def known_fact_prompt(example: data.KnownFact) -> str:
    """The fact's own prompt: it ends where the model names the attribute (ROME's known facts)."""
    return example.prompt


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
    pairs = []
    for start in perplexity_window_starts(len(token_ids), stride=stride, count=count, seed=seed):
        history = list(prefix) + list(token_ids[max(0, start - context):start])
        scored = list(token_ids[start:start + stride])
        if not history:
            history, scored = scored[:1], scored[1:]
        pairs.append(EncodedPair(tuple(history), tuple(scored)))
    return pairs


def token_count(tokenizer, fmt: PromptFormat, text: str) -> int:
    """Tokens of ``text`` as the format tokenises it (with the tokenizer's special tokens for ``raw``)."""
    return len(tokenizer(text, add_special_tokens=fmt.add_special_tokens, verbose=False)["input_ids"])


def perplexity_window_starts(n_tokens: int, *, stride: int, count: int, seed: int) -> list[int]:
    """The token offsets (ascending) of the first scored token of each window ``perplexity_windows``
    draws: what identifies a window across arms (the ``examples`` table's ``window_start``)."""
    starts = list(range(0, n_tokens - stride + 1, stride))
    return [starts[i] for i in seeded_sample(len(starts), count, f"{seed}:wikitext")]  # starts ascend


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

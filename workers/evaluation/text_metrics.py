"""Scores of generated text: SQuAD-style exact match, ROUGE (via rouge-score), label words."""

from __future__ import annotations

import re
import string
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation (Rajpurkar et al., 2016; as in Chen et al., 2017 and Lee et al., 2019):
    lower-case, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, answers: Sequence[str]) -> bool:
    """Whether the normalised prediction equals any normalised reference answer."""
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(answer) for answer in answers)


def contains_answer(prediction: str, answers: Sequence[str]) -> bool:
    """Whether some normalised reference answer occurs, as whole words, in the normalised prediction
    (a lenient extra signal for small models whose answers run on)."""
    predicted = f" {normalize_answer(prediction)} "
    return any(normalize_answer(answer) and f" {normalize_answer(answer)} " in predicted for answer in answers)


def begins_with_answer(prediction: str, answer: str) -> bool:
    """Whether the normalised prediction's first words are the normalised answer's words."""
    words = normalize_answer(answer).split()
    return bool(words) and normalize_answer(prediction).split()[:len(words)] == words


def first_line(text: str) -> str:
    """The text up to its first line break, blank lines and surrounding whitespace dropped: a
    generated answer, or an error message as a status reason."""
    return text.lstrip().split("\n", 1)[0].strip()


def first_word(text: str) -> str:
    """The first word of a generated answer, lower-cased, surrounding punctuation stripped."""
    words = text.split()
    return words[0].strip(string.punctuation).lower() if words else ""


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_f1(predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = True
             ) -> list[dict[str, float]]:
    """ROUGE-1/2/L F-measures per example, computed by Google's rouge-score package (Lin, 2004).

    Not the EAC authors' ROUGE: their script scores with pltrdy's ``rouge`` package (another
    implementation, with its own tokenisation and ROUGE-L, and no ``use_stemmer``) and cuts the last
    13 characters off each generated summary before scoring. Their absolute SAMSum numbers are
    therefore not comparable with ours digit for digit; retention (a ratio of two scores from the
    same scorer) is much less affected.
    """
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    return [{name: score.fmeasure for name, score in scorer.score(reference, prediction).items()}
            for prediction, reference in zip(predictions, references)]

"""Editing metrics for sequential editing, over every request edited so far.

Three families, each reported under its own task name:

- ``edit/toolkit`` — the token-level protocol of the editing toolkits, which the EAC paper reports
  (its Eqs. 10-12): feed ``prompt + " " + target`` teacher-forced; a request's score is the share of
  target tokens whose argmax matches. ``reliability`` on the edit prompt, ``generalisation`` on the
  rephrase prompts (mean per request, then over requests), ``locality`` = share of positions where
  the edited model's argmax on ``locality prompt + " " + its answer`` equals the *unedited* model's.
- ``edit/counterfact`` — the ROME/MEMIT paper protocol: ``efficacy`` = share of requests where
  NLL(target_new) < NLL(target_true) on the edit prompt, ``paraphrase`` the same on rephrase prompts
  (mean per request, then over requests), ``neighbourhood`` = share of locality prompts where
  NLL(their answer) < NLL(target_new) (in CounterFact the neighbours' answer is target_true). NLL is
  the mean per target token, as in ROME's evaluation code.
- ``edit/generative`` — greedy decoding from the edit prompt (``reliability``) and the rephrase
  prompts (``generalisation``); a success when the decoded text begins with the target. Published
  work finds live decoding far harsher than teacher forcing after many edits; both are reported.

The unedited model's locality predictions come from ``unedited_locality_argmax``, which computes them
once per base model through a ``ReferenceCache``.
"""

from __future__ import annotations

from itertools import groupby
from typing import Sequence

import torch

from workers.data import EditRequest
from workers.evaluation.config import EDIT_METRIC_FAMILIES, Example, MetricRow, examples_row
from workers.evaluation.reference import ReferenceCache, text_key
from workers.evaluation.scoring import ContinuationScore, encode_pair, score_continuations
from workers.generation import begins_with, greedy_continuations


def _continuation(answer: str) -> str:
    return " " + answer.strip()


def locality_items(request: EditRequest) -> list[tuple[str, str]]:
    """(locality prompt, its answer) pairs of a request; a clear error when they do not line up."""
    if len(request.locality_prompts) != len(request.locality_answers):
        raise ValueError(f"request {request.case_id}: field 'locality_answers': {len(request.locality_answers)} "
                         f"answers for {len(request.locality_prompts)} locality prompts")
    return list(zip(request.locality_prompts, request.locality_answers))


def _locality_keys(request: EditRequest) -> list[str]:
    return [text_key(request.case_id, index, prompt, answer)
            for index, (prompt, answer) in enumerate(locality_items(request))]


def unedited_locality_argmax(model, tokenizer, requests: Sequence[EditRequest], cache: ReferenceCache,
                             model_fingerprint: str, *, batch_size: int = 16,
                             progress: bool = False) -> list[list[torch.Tensor]]:
    """Per request, per locality prompt: the argmax tokens of ``model`` (which must hold the unedited
    weights) at the answer's positions. Cached in ``cache`` under ``model_fingerprint``."""
    items = [(request, pair) for request in requests for pair in locality_items(request)]
    keys = [key for request in requests for key in _locality_keys(request)]

    def compute(missing: list[int]) -> list[torch.Tensor]:
        pairs = [(items[i][1][0], _continuation(items[i][1][1])) for i in missing]
        scores = score_continuations(model, tokenizer, pairs, batch_size=batch_size, progress=progress,
                                     desc="locality reference")
        return [score.argmax_ids for score in scores]

    flat = cache.get_or_compute(model_fingerprint, "locality_argmax", keys, compute)
    grouped, start = [], 0
    for request in requests:
        count = len(request.locality_prompts)
        grouped.append(flat[start:start + count])
        start += count
    return grouped


class _PairScores:
    """Scores every (prompt, continuation) pair the requested families need in one batched pass."""

    def __init__(self):
        self.index: dict[tuple[str, str], int] = {}

    def need(self, prompt: str, answer: str) -> None:
        self.index.setdefault((prompt, _continuation(answer)), len(self.index))

    def run(self, model, tokenizer, *, batch_size: int, progress: bool) -> None:
        self.scores = score_continuations(model, tokenizer, list(self.index), batch_size=batch_size,
                                          progress=progress, desc="edit metrics")

    def __call__(self, prompt: str, answer: str) -> ContinuationScore:
        return self.scores[self.index[(prompt, _continuation(answer))]]


def _target_true(request: EditRequest) -> str:
    if not request.target_true:
        raise ValueError(f"request {request.case_id}: field 'target_true' is missing; the counterfact "
                         "metrics compare target_new with it")
    return request.target_true


def request_example(request: EditRequest, value: float, prompt_kind: str) -> Example:
    """A request's score as an example of the ``examples`` table: keyed by its case id; ``prompt_kind``
    says which of its prompts it is over (``edit``: the edit prompt, index 0; ``rephrase`` /
    ``locality``: the mean over all of that kind, so no index)."""
    case_id = str(request.case_id)
    return Example(case_id, float(value), case_id=case_id, prompt_kind=prompt_kind,
                   prompt_index=0 if prompt_kind == "edit" else None)


def toolkit_rows(requests: Sequence[EditRequest], score: _PairScores,
                 locality_reference: Sequence[Sequence[torch.Tensor]]) -> list[MetricRow]:
    reliability = [request_example(r, score(r.prompt, r.target_new).token_accuracy, "edit") for r in requests]
    generalisation = [request_example(r, sum(score(p, r.target_new).token_accuracy for p in r.rephrase_prompts)
                                      / len(r.rephrase_prompts), "rephrase")
                      for r in requests if r.rephrase_prompts]
    locality = []
    for request, reference in zip(requests, locality_reference):
        agreements = [(score(prompt, answer).argmax_ids == unedited).float().mean().item()
                      for (prompt, answer), unedited in zip(locality_items(request), reference)]
        if agreements:
            locality.append(request_example(request, sum(agreements) / len(agreements), "locality"))
    return [examples_row("edit/toolkit", "reliability", reliability),
            examples_row("edit/toolkit", "generalisation", generalisation),
            examples_row("edit/toolkit", "locality", locality)]


def counterfact_rows(requests: Sequence[EditRequest], score: _PairScores) -> list[MetricRow]:
    def new_beats_true(prompt: str, request: EditRequest) -> bool:
        return score(prompt, request.target_new).mean_nll < score(prompt, _target_true(request)).mean_nll

    efficacy = [request_example(r, float(new_beats_true(r.prompt, r)), "edit") for r in requests]
    paraphrase = [request_example(r, sum(new_beats_true(p, r) for p in r.rephrase_prompts) / len(r.rephrase_prompts),
                                  "rephrase")
                  for r in requests if r.rephrase_prompts]
    neighbourhood = []
    for request in requests:
        items = locality_items(request)
        if items:
            kept = [score(p, answer).mean_nll < score(p, request.target_new).mean_nll for p, answer in items]
            neighbourhood.append(request_example(request, sum(kept) / len(kept), "locality"))
    return [examples_row("edit/counterfact", "efficacy", efficacy),
            examples_row("edit/counterfact", "paraphrase", paraphrase),
            examples_row("edit/counterfact", "neighbourhood", neighbourhood)]


def generative_rows(model, tokenizer, requests: Sequence[EditRequest], *, batch_size: int = 16,
                    max_new_tokens: int | None = None, progress: bool = False) -> list[MetricRow]:
    """Greedy decoding from edit and rephrase prompts; success = the text begins with target_new."""
    jobs = []  # (request index, is_rephrase, prompt, tokens to decode)
    for index, request in enumerate(requests):
        for prompt, is_rephrase in [(request.prompt, False)] + [(p, True) for p in request.rephrase_prompts]:
            needed = max_new_tokens or len(encode_pair(tokenizer, prompt, _continuation(request.target_new))
                                           .continuation_ids) + 2
            jobs.append((index, is_rephrase, prompt, needed))
    success: list[bool | None] = [None] * len(jobs)
    by_length = sorted(range(len(jobs)), key=lambda j: jobs[j][3])
    for needed, group in groupby(by_length, key=lambda j: jobs[j][3]):
        group = list(group)
        texts = greedy_continuations(model, tokenizer, [jobs[j][2] for j in group], max_new_tokens=needed,
                                     batch_size=batch_size, sort_by_length=True, progress=progress)
        for j, text in zip(group, texts):
            success[j] = begins_with(text, requests[jobs[j][0]].target_new)
    reliability = [request_example(requests[index], float(ok), "edit")
                   for (index, rephrase, _, _), ok in zip(jobs, success) if not rephrase]
    per_request: dict[int, list[bool]] = {}
    for (index, rephrase, _, _), ok in zip(jobs, success):
        if rephrase:
            per_request.setdefault(index, []).append(bool(ok))
    generalisation = [request_example(requests[index], sum(oks) / len(oks), "rephrase")
                      for index, oks in per_request.items()]
    return [examples_row("edit/generative", "reliability", reliability),
            examples_row("edit/generative", "generalisation", generalisation)]


def edit_metric_rows(model, tokenizer, requests: Sequence[EditRequest], *,
                     families: Sequence[str] = EDIT_METRIC_FAMILIES,
                     locality_reference: Sequence[Sequence[torch.Tensor]] | None = None,
                     batch_size: int = 16, generative_max_new_tokens: int | None = None,
                     progress: bool = False) -> list[MetricRow]:
    """The editing metrics of ``model`` (as it is now) on ``requests``.

    ``locality_reference``: the unedited model's argmax tokens from ``unedited_locality_argmax``
    (required by the ``toolkit`` family).
    """
    unknown = set(families) - set(EDIT_METRIC_FAMILIES)
    if unknown:
        raise ValueError(f"unknown editing-metric families {sorted(unknown)}; known: {list(EDIT_METRIC_FAMILIES)}")
    if not requests:
        return []
    score = _PairScores()
    for request in requests:
        if "toolkit" in families or "counterfact" in families:
            for prompt in (request.prompt, *request.rephrase_prompts):
                score.need(prompt, request.target_new)
                if "counterfact" in families:
                    score.need(prompt, _target_true(request))
            for prompt, answer in locality_items(request):
                score.need(prompt, answer)
                if "counterfact" in families:
                    score.need(prompt, request.target_new)
    rows: list[MetricRow] = []
    if score.index:
        score.run(model, tokenizer, batch_size=batch_size, progress=progress)
    if "toolkit" in families:
        if locality_reference is None or len(locality_reference) != len(requests):
            raise ValueError("the toolkit family needs the unedited model's locality predictions, one list per "
                             "request (unedited_locality_argmax)")
        rows += toolkit_rows(requests, score, locality_reference)
    if "counterfact" in families:
        rows += counterfact_rows(requests, score)
    if "generative" in families:
        rows += generative_rows(model, tokenizer, requests, batch_size=batch_size,
                                max_new_tokens=generative_max_new_tokens, progress=progress)
    return rows

"""Edit requests and task examples, read from the data directory.

Every loader takes the data directory (``settings.data_dir()`` by default) and returns typed records.
A record with a missing or empty field, or a subject that does not occur in its prompt, raises
``DataError`` naming the file, the record and the field; with ``skip_invalid=True`` such records are
skipped instead and counted in the returned ``LoadReport`` — nothing is dropped silently.

When a file is absent and the machine is online, ``ensure_file`` downloads it from its canonical
source (CounterFact and zsRE from their authors' URLs; the GLUE/SAMSum/NQ/MMLU/WikiText task files
are exported from the Hugging Face hub with ``datasets``).
"""

from __future__ import annotations

import csv
import functools
import json
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from workers import settings


class DataError(ValueError):
    """A bad record: names the file, the record (case id or line) and the field."""

    def __init__(self, path: Path | str, record: Any, field_name: str, problem: str):
        self.path, self.record, self.field, self.problem = str(path), record, field_name, problem
        super().__init__(f"{path}: record {record}: field {field_name!r}: {problem}")


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: ``prompt`` contains ``subject``; the model should continue with ``target_new``."""

    case_id: int | str
    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()

    @property
    def prompt_template(self) -> str:
        """The prompt with the subject's last occurrence replaced by ``{}`` (ROME's convention)."""
        # Literal braces in the prompt are escaped so that ``template.format(subject)`` round-trips.
        body = self.prompt.replace("{", "{{").replace("}", "}}")
        esc_subject = self.subject.replace("{", "{{").replace("}", "}}")
        start = body.rindex(esc_subject)
        return body[:start] + "{}" + body[start + len(esc_subject):]


@dataclass(frozen=True)
class NLIExample:
    premise: str
    hypothesis: str
    entailment: bool


@dataclass(frozen=True)
class SentimentExample:
    text: str
    positive: bool


@dataclass(frozen=True)
class SummaryExample:
    dialogue: str
    summary: str


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: tuple[str, ...]
    passage: str


@dataclass(frozen=True)
class MultipleChoiceExample:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str


@dataclass(frozen=True)
class KnownFact:
    """A fact stated by a prompt that ends where the model names ``attribute`` (ROME's known facts)."""

    prompt: str
    subject: str
    attribute: str


@dataclass
class LoadReport:
    path: str
    n_read: int = 0
    skipped: list[DataError] = field(default_factory=list)

    @property
    def n_loaded(self) -> int:
        return self.n_read - len(self.skipped)

    def summary(self) -> str:
        text = f"{self.path}: {self.n_loaded} of {self.n_read} records loaded"
        if self.skipped:
            reasons = "; ".join(str(e.record) + f" ({e.field}: {e.problem})" for e in self.skipped[:5])
            text += f", {len(self.skipped)} skipped: {reasons}" + (" ..." if len(self.skipped) > 5 else "")
        return text


# --------------------------------------------------------------------------------------------
# Files and downloads

# Canonical sources, for users who are online. The ROME authors publish CounterFact (original schema)
# and zsRE; the task files are exported from the Hugging Face hub.
URL_SOURCES: dict[str, str] = {
    "counterfact/counterfact.json": "https://rome.baulab.info/data/dsets/counterfact.json",
    "zsre/zsre_mem-eval.json": "https://rome.baulab.info/data/dsets/zsre_mem-eval.json",
    "known/known_1000.json": "https://rome.baulab.info/data/dsets/known_1000.json",
}


def ensure_file(relpath: str, data_root: str | Path | None = None, *, url: str | None = None,
                exporter: Callable[[Path], None] | None = None) -> Path:
    """The path of ``relpath`` under the data directory, downloading it first if it is absent.

    ``url`` overrides the canonical URL (tests serve a file on loopback); ``exporter`` writes the file
    itself (hub exports). Downloads land in a temporary file that is renamed when complete.
    """
    root = settings.data_dir(data_root)
    path = root / relpath
    if path.exists():
        return path
    url = url or URL_SOURCES.get(relpath)
    if settings.offline() or (url is None and exporter is None):
        raise FileNotFoundError(f"{path} does not exist (data directory {root}; set EAC_DATA_DIR or "
                                f"--data-dir{'' if settings.offline() else ', or go online to download it'})")
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        if exporter is not None:
            exporter(partial)
        else:
            with urllib.request.urlopen(url, timeout=60) as response, open(partial, "wb") as out:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
    except Exception as exc:
        partial.unlink(missing_ok=True)
        raise FileNotFoundError(f"{path} is absent and fetching it from {url or 'the hub'} failed: {exc}") from exc
    partial.rename(path)
    return path


def _read_json_records(path: Path) -> list[dict]:
    try:
        if path.suffix == ".jsonl":
            records = []
            for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                if line.strip():
                    try:
                        records.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise DataError(path, f"line {line_no}", "<json>", str(exc)) from exc
                    except RecursionError:
                        raise DataError(path, f"line {line_no}", "<json>", "nested too deeply") from None
            return records
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(path, f"line {exc.lineno}", "<json>", str(exc)) from exc
    except UnicodeDecodeError as exc:
        raise DataError(path, "<file>", "<encoding>", f"not UTF-8 text (byte {exc.start})") from exc
    except RecursionError:  # json's parser recurses once per level of nesting
        raise DataError(path, "<top level>", "<json>", "nested too deeply") from None
    if not isinstance(records, list):
        raise DataError(path, "<top level>", "<json>", "expected a list of records")
    return records


def _text(record: dict, key: str, path: Path, record_id: Any) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(path, record_id, key, "missing")
    if not isinstance(value, str):
        raise DataError(path, record_id, key, f"expected text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(path, record_id, key, "empty")
    return value


def _texts(record: dict, key: str, path: Path, record_id: Any) -> tuple[str, ...]:
    """A list of prompts (absent: none). A string is refused: iterating it would give its characters."""
    value = record.get(key)
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DataError(path, record_id, key, f"expected a list of texts, got {type(value).__name__}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            raise DataError(path, record_id, f"{key}[{i}]", f"expected non-empty text, got {item!r}")
    return tuple(value)


def _object(record: dict, key: str, path: Path, record_id: Any) -> dict:
    value = record.get(key)
    if not isinstance(value, dict):
        raise DataError(path, record_id, key, f"expected an object, got {type(value).__name__}")
    return value


def _case_id(record: dict, index: int, path: Path) -> int | str:
    """The record's ``case_id`` (its index when absent): an integer or a non-empty text."""
    if "case_id" not in record:
        return index
    value = record["case_id"]
    if isinstance(value, bool) or not isinstance(value, (int, str)) or (isinstance(value, str) and not value.strip()):
        raise DataError(path, index, "case_id", f"expected an integer or text, got {value!r}")
    return value


def _unique_case_ids(path: Path, requests: list[EditRequest]) -> list[EditRequest]:
    # Edit rows, logs and evaluations are keyed by case id: two requests with one id would merge.
    seen: set[str] = set()
    for request in requests:
        if str(request.case_id) in seen:
            raise DataError(path, request.case_id, "case_id", "used by an earlier record too")
        seen.add(str(request.case_id))
    return requests


def _collect(path: Path, records: Iterable[Any], parse: Callable[[Any, int], Any], skip_invalid: bool,
             report: LoadReport | None) -> list:
    report = report if report is not None else LoadReport(str(path))
    report.path = str(path)
    out = []
    for index, record in enumerate(records):
        report.n_read += 1
        try:
            if not isinstance(record, dict):
                raise DataError(path, index, "<record>", f"expected an object, got {type(record).__name__}")
            out.append(parse(record, index))
        except DataError as exc:
            if not skip_invalid:
                raise
            report.skipped.append(exc)
    return out


def _edit_request(path: Path, record_id: Any, prompt: str, subject: str, target_new: str, **rest) -> EditRequest:
    if subject not in prompt:
        raise DataError(path, record_id, "subject", f"{subject!r} does not occur in the prompt {prompt!r}")
    return EditRequest(case_id=record_id, prompt=prompt, subject=subject, target_new=target_new, **rest)


# --------------------------------------------------------------------------------------------
# Edit data sets

COUNTERFACT_FILES = {"edit": "counterfact/counterfact-edit.json", "val": "counterfact/counterfact-val.json",
                     "full": "counterfact/counterfact.json"}
ZSRE_FILES = {"eval": "zsre/zsre_mend_eval.json", "train": "zsre/zsre_mend_train-1k.json",
              "mem-eval": "zsre/zsre_mem-eval.json"}


def load_counterfact(split: str = "edit", data_root: str | Path | None = None, *, path: str | Path | None = None,
                     skip_invalid: bool = False, report: LoadReport | None = None,
                     url: str | None = None) -> list[EditRequest]:
    """CounterFact in either schema: the flattened toolkit one (``prompt, subject, target_new,
    ground_truth, rephrase_prompt, locality_prompt, locality_ground_truth``) or the ROME authors'
    original (``requested_rewrite`` with a ``{}`` prompt template, ``paraphrase_prompts``,
    ``neighborhood_prompts``)."""
    if path is None:
        if split not in COUNTERFACT_FILES:
            raise ValueError(f"unknown CounterFact split {split!r}; known: {sorted(COUNTERFACT_FILES)}")
        path = ensure_file(COUNTERFACT_FILES[split], data_root, url=url)
    path = Path(path)

    def parse(record: dict, index: int) -> EditRequest:
        case_id = _case_id(record, index, path)
        if "requested_rewrite" in record:
            rewrite = _object(record, "requested_rewrite", path, case_id)
            template = _text(rewrite, "prompt", path, case_id)
            subject = _text(rewrite, "subject", path, case_id)
            if "{}" not in template:
                raise DataError(path, case_id, "requested_rewrite.prompt", "has no {} slot for the subject")
            target_new = _text(_object(rewrite, "target_new", path, case_id), "str", path, case_id)
            target_true = None
            if rewrite.get("target_true") is not None:
                target_true = _text(_object(rewrite, "target_true", path, case_id), "str", path, case_id)
            neighbours = _texts(record, "neighborhood_prompts", path, case_id)
            return _edit_request(path, case_id, template.format(subject), subject, target_new,
                                 target_true=target_true,
                                 rephrase_prompts=_texts(record, "paraphrase_prompts", path, case_id),
                                 locality_prompts=neighbours,
                                 locality_answers=(target_true,) * len(neighbours) if target_true else ())
        prompt = _text(record, "prompt", path, case_id)
        subject = _text(record, "subject", path, case_id)
        target_new = _text(record, "target_new", path, case_id)
        target_true = _text(record, "ground_truth", path, case_id)
        rephrase = _text(record, "rephrase_prompt", path, case_id)
        loc_prompt = _text(record, "locality_prompt", path, case_id)
        loc_answer = _text(record, "locality_ground_truth", path, case_id)
        return _edit_request(path, case_id, prompt, subject, target_new, target_true=target_true,
                             rephrase_prompts=(rephrase,), locality_prompts=(loc_prompt,),
                             locality_answers=(loc_answer,))

    return _unique_case_ids(path, _collect(path, _read_json_records(path), parse, skip_invalid, report))


def load_zsre(split: str = "eval", data_root: str | Path | None = None, *, path: str | Path | None = None,
              skip_invalid: bool = False, report: LoadReport | None = None,
              url: str | None = None) -> list[EditRequest]:
    """zsRE in the MEND schema: edit prompt ``src``, target ``alt``, rephrase ``rephrase``, locality
    prompt ``loc`` (an NQ question) with answer ``loc_ans``. Case ids are record indices."""
    if path is None:
        if split not in ZSRE_FILES:
            raise ValueError(f"unknown zsRE split {split!r}; known: {sorted(ZSRE_FILES)}")
        path = ensure_file(ZSRE_FILES[split], data_root, url=url)
    path = Path(path)

    def parse(record: dict, index: int) -> EditRequest:
        case_id = _case_id(record, index, path)
        answers = _texts(record, "answers", path, case_id)  # a string would give its first character
        pred = record.get("pred")
        if pred is not None and not isinstance(pred, str):
            raise DataError(path, case_id, "pred", f"expected text, got {type(pred).__name__}")
        return _edit_request(
            path, case_id, _text(record, "src", path, case_id), _text(record, "subject", path, case_id),
            _text(record, "alt", path, case_id), target_true=answers[0] if answers else pred,
            rephrase_prompts=(_text(record, "rephrase", path, case_id),),
            locality_prompts=(_text(record, "loc", path, case_id),),
            locality_answers=(_text(record, "loc_ans", path, case_id),))

    return _unique_case_ids(path, _collect(path, _read_json_records(path), parse, skip_invalid, report))


def load_edit_dataset(name: str, data_root: str | Path | None = None, **kwargs) -> list[EditRequest]:
    """By name (an edit data set of ``DATASETS``: ``counterfact``, ``zsre``, ...) or a JSON file path."""
    if name in EDIT_DATASETS:
        return DATASETS[name].load(data_root, **kwargs)
    path = Path(name)
    if path.is_file():
        first = _read_json_records(path)[:1]
        loader = load_zsre if first and isinstance(first[0], dict) and "src" in first[0] else load_counterfact
        return loader(path=path, **kwargs)
    raise ValueError(f"unknown edit data set {name!r}; known: {list(EDIT_DATASETS)} or a JSON file path")


def check_lengths(requests: Sequence[EditRequest], tokenizer, context: int | None, source: str | Path) -> None:
    """Refuse a request whose prompt (with a target or answer after it) is longer than the model's
    context: found here, before any edit, not at the first checkpoint after all of them."""
    if not context:
        return
    for request in requests:
        texts = [("prompt", f"{request.prompt} {request.target_new}")]
        texts += [("rephrase_prompts", f"{text} {request.target_new}") for text in request.rephrase_prompts]
        texts += [("locality_prompts", f"{text} {answer}")
                  for text, answer in zip(request.locality_prompts, request.locality_answers or ("",) * 10**6)]
        for field_name, text in texts:
            # No token spans 64 characters: a longer text is refused without tokenizing megabytes.
            tokens = len(text) if len(text) > 64 * context else len(tokenizer(text)["input_ids"])
            if tokens > context:
                raise DataError(source, request.case_id, field_name,
                                f"{tokens:,} tokens with its target, longer than the model's context of {context:,}")


def edit_dataset_file(name: str) -> str:
    """The data-directory path of a named edit data set, or the name itself when it is a file."""
    return DATASETS[name].file if name in EDIT_DATASETS else name


# --------------------------------------------------------------------------------------------
# General-ability tasks

TASK_FILES = {"rte": "tasks/rte.tsv", "rte-dev": "tasks/rte_dev.jsonl", "sst2": "tasks/sst2.tsv",
              "samsum": "tasks/samsum.json", "nq": "tasks/nq.jsonl", "mmlu": "tasks/mmlu.jsonl",
              "known": "known/known_1000.json"}
TEXT_FILES = {"wikitext-test": "text/wikitext-2-raw-test.txt", "wikitext-valid": "text/wikitext-2-valid.txt"}


def _read_tsv(path: Path) -> list[dict]:
    # RTE sentences contain quote characters that are literal text, not CSV quoting.
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))


def _task_path(name: str, data_root, path) -> Path:
    return Path(path) if path is not None else ensure_file(TASK_FILES[name], data_root,
                                                           exporter=_hub_exporter(name))


def load_rte(data_root=None, *, path=None, split: str = "train", skip_invalid=False, report=None) -> list[NLIExample]:
    """RTE from the GLUE TSV (``label`` entailment/not_entailment) or the JSONL dev file (0 = entailment)."""
    path = _task_path("rte" if split == "train" else "rte-dev", data_root, path)
    records = _read_json_records(path) if path.suffix == ".jsonl" else _read_tsv(path)

    def parse(record: dict, index: int) -> NLIExample:
        rid = record.get("idx", record.get("index", index))
        label = record.get("label")
        if label in ("entailment", 0, "0"):
            entails = True
        elif label in ("not_entailment", 1, "1"):
            entails = False
        else:
            raise DataError(path, rid, "label", f"expected entailment/not_entailment or 0/1, got {label!r}")
        return NLIExample(_text(record, "sentence1", path, rid), _text(record, "sentence2", path, rid), entails)

    return _collect(path, records, parse, skip_invalid, report)


def load_sst2(data_root=None, *, path=None, skip_invalid=False, report=None) -> list[SentimentExample]:
    path = _task_path("sst2", data_root, path)

    def parse(record: dict, index: int) -> SentimentExample:
        label = record.get("label")
        if label not in ("0", "1", 0, 1):
            raise DataError(path, f"line {index + 2}", "label", f"expected 0 or 1, got {label!r}")
        return SentimentExample(_text(record, "sentence", path, f"line {index + 2}").strip(), int(label) == 1)

    return _collect(path, _read_tsv(path), parse, skip_invalid, report)


def load_samsum(data_root=None, *, path=None, skip_invalid=False, report=None) -> list[SummaryExample]:
    path = _task_path("samsum", data_root, path)

    def parse(record: dict, index: int) -> SummaryExample:
        rid = record.get("id", index)
        return SummaryExample(_text(record, "dialogue", path, rid), _text(record, "summary", path, rid))

    return _collect(path, _read_json_records(path), parse, skip_invalid, report)


def load_nq(data_root=None, *, path=None, skip_invalid=False, report=None) -> list[QAExample]:
    path = _task_path("nq", data_root, path)

    def parse(record: dict, index: int) -> QAExample:
        rid = f"line {index + 1}"
        answers = record.get("answer")
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
            raise DataError(path, rid, "answer", "expected a non-empty list of answers")
        output = record.get("output")
        if not isinstance(output, list) or not output or not isinstance(output[0], str) or not output[0].strip():
            raise DataError(path, rid, "output", "expected a list whose first element is the passage")
        return QAExample(_text(record, "question", path, rid), tuple(answers), output[0].strip())

    return _collect(path, _read_json_records(path), parse, skip_invalid, report)


def load_mmlu(data_root=None, *, path=None, skip_invalid=False, report=None) -> list[MultipleChoiceExample]:
    path = _task_path("mmlu", data_root, path)

    def parse(record: dict, index: int) -> MultipleChoiceExample:
        rid = f"line {index + 1}"
        choices = record.get("choices")
        if not isinstance(choices, list) or len(choices) != 4:
            raise DataError(path, rid, "choices", "expected a list of 4 choices")
        answer = record.get("answer")
        if not isinstance(answer, int) or not 0 <= answer < 4:
            raise DataError(path, rid, "answer", f"expected an index 0..3, got {answer!r}")
        return MultipleChoiceExample(_text(record, "question", path, rid), tuple(str(c) for c in choices), answer,
                                     str(record.get("subject", "")))

    return _collect(path, _read_json_records(path), parse, skip_invalid, report)


def load_known(data_root=None, *, path=None, skip_invalid=False, report=None) -> list[KnownFact]:
    """ROME's known facts (``known_1000.json``): ``prompt`` (it contains ``subject``) and ``attribute``,
    the object GPT-2 XL names after it (Meng et al., 2022, causal tracing)."""
    path = Path(path) if path is not None else ensure_file(TASK_FILES["known"], data_root)

    def parse(record: dict, index: int) -> KnownFact:
        rid = record.get("known_id", index)
        prompt, subject = _text(record, "prompt", path, rid), _text(record, "subject", path, rid)
        if subject not in prompt:
            raise DataError(path, rid, "subject", f"{subject!r} does not occur in the prompt {prompt!r}")
        return KnownFact(prompt, subject, _text(record, "attribute", path, rid).strip())

    return _collect(path, _read_json_records(path), parse, skip_invalid, report)


def load_text(name: str = "wikitext-test", data_root=None, *, path=None) -> str:
    """A plain-text corpus (WikiText-2) for second-moment statistics and perplexity."""
    if path is None:
        if name not in TEXT_FILES:
            raise ValueError(f"unknown text corpus {name!r}; known: {sorted(TEXT_FILES)}")
        path = ensure_file(TEXT_FILES[name], data_root, exporter=_hub_exporter(name))
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(path, "<file>", "<text>", "empty corpus")
    return text


def text_paragraphs(text: str, min_chars: int = 1) -> list[str]:
    """WikiText paragraphs: non-empty lines that are not section headings (`` = Title = ``)."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if len(line) >= min_chars and not (line.startswith("=") and line.endswith("="))]


# --------------------------------------------------------------------------------------------
# The data sets: one table of every file the toolkit reads


@dataclass(frozen=True)
class DataSet:
    """One data file: its name, its path under the data directory, what it is (``edit`` requests,
    ``task`` examples or a ``text`` corpus), the loader that reads it (``load(data_root, **options)``;
    ``skip_invalid`` and ``report`` for record files) and the record type it gives (the schema)."""

    name: str
    file: str
    kind: str
    load: Callable[..., Any]
    record: type


DATASETS: dict[str, DataSet] = {d.name: d for d in (
    DataSet("counterfact", COUNTERFACT_FILES["edit"], "edit", functools.partial(load_counterfact, "edit"), EditRequest),
    DataSet("counterfact-val", COUNTERFACT_FILES["val"], "edit", functools.partial(load_counterfact, "val"),
            EditRequest),
    DataSet("zsre", ZSRE_FILES["eval"], "edit", functools.partial(load_zsre, "eval"), EditRequest),
    DataSet("zsre-train", ZSRE_FILES["train"], "edit", functools.partial(load_zsre, "train"), EditRequest),
    DataSet("rte", TASK_FILES["rte"], "task", load_rte, NLIExample),
    DataSet("rte-dev", TASK_FILES["rte-dev"], "task", functools.partial(load_rte, split="dev"), NLIExample),
    DataSet("sst2", TASK_FILES["sst2"], "task", load_sst2, SentimentExample),
    DataSet("samsum", TASK_FILES["samsum"], "task", load_samsum, SummaryExample),
    DataSet("nq", TASK_FILES["nq"], "task", load_nq, QAExample),
    DataSet("mmlu", TASK_FILES["mmlu"], "task", load_mmlu, MultipleChoiceExample),
    DataSet("known", TASK_FILES["known"], "task", load_known, KnownFact),
    DataSet("wikitext-test", TEXT_FILES["wikitext-test"], "text", functools.partial(load_text, "wikitext-test"), str),
    DataSet("wikitext-valid", TEXT_FILES["wikitext-valid"], "text", functools.partial(load_text, "wikitext-valid"),
            str),
)}
EDIT_DATASETS = tuple(name for name, d in DATASETS.items() if d.kind == "edit")  # what a spec's datasets name
# Which data set each general-ability task reads is part of the task's record
# (``workers.evaluation.tasks.TASKS``).


# --------------------------------------------------------------------------------------------
# Hub exports for online users: write the hub's copy in the same file format as the shared data.


def _hub_exporter(name: str) -> Callable[[Path], None] | None:
    def rows(dataset_id: str, config: str | None, split: str):
        from datasets import load_dataset  # imported lazily: only online users reach this

        return load_dataset(dataset_id, config, split=split)

    def write_tsv(out: Path, header: list[str], items: Iterable[list]) -> None:
        with open(out, "w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle, delimiter="\t", quoting=csv.QUOTE_NONE, escapechar="\\")
            writer.writerow(header)
            writer.writerows(items)

    def write_jsonl(out: Path, items: Iterable[dict]) -> None:
        with open(out, "w", encoding="utf-8") as handle:
            for item in items:
                handle.write(json.dumps(item) + "\n")

    # NQ-open on the hub carries no supporting passages, so tasks/nq.jsonl has no export here.
    labels = ["entailment", "not_entailment"]
    exporters: dict[str, Callable[[Path], None]] = {
        "rte": lambda out: write_tsv(out, ["index", "sentence1", "sentence2", "label"],
                                     ([r["idx"], r["sentence1"], r["sentence2"], labels[r["label"]]]
                                      for r in rows("nyu-mll/glue", "rte", "train"))),
        "rte-dev": lambda out: write_jsonl(out, rows("nyu-mll/glue", "rte", "validation")),
        "sst2": lambda out: write_tsv(out, ["sentence", "label"],
                                      ([r["sentence"], r["label"]] for r in rows("nyu-mll/glue", "sst2", "validation"))),
        "samsum": lambda out: out.write_text(json.dumps(list(rows("knkarthick/samsum", None, "validation")))),
        "mmlu": lambda out: write_jsonl(out, rows("cais/mmlu", "all", "test")),
        "wikitext-test": lambda out: out.write_text("".join(r["text"] for r in rows("Salesforce/wikitext", "wikitext-2-raw-v1", "test"))),
        "wikitext-valid": lambda out: out.write_text("".join(r["text"] for r in rows("Salesforce/wikitext", "wikitext-2-v1", "validation"))),
    }
    return exporters.get(name)

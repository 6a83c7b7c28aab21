import functools
import http.server
import json
import threading

import pytest

from workers import data

# Record counts of the shared data files (as their providers publish them).
EXPECTED_COUNTS = {
    "counterfact-edit": (lambda: data.load_counterfact("edit"), 10_000),
    "counterfact-val": (lambda: data.load_counterfact("val"), 1_919),
    "zsre-eval": (lambda: data.load_zsre("eval"), 1_037),
    "rte": (data.load_rte, 2_489),
    "rte-dev": (lambda: data.load_rte(split="dev"), 262),
    "sst2": (data.load_sst2, 872),
    "samsum": (data.load_samsum, 818),
    "nq": (data.load_nq, 3_610),
    "mmlu": (data.load_mmlu, 1_516),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_shared_data_record_counts(name, data_root):
    load, expected = EXPECTED_COUNTS[name]
    assert len(load()) == expected


def test_zsre_train_has_two_empty_targets(data_root):
    # The shared zsRE train-1k file holds 1,000 records, two of which have an empty `alt`.
    with pytest.raises(data.DataError) as info:
        data.load_zsre("train")
    assert info.value.field == "alt" and info.value.record == 534
    assert "zsre_mend_train-1k.json" in str(info.value)
    report = data.LoadReport("zsre")
    loaded = data.load_zsre("train", skip_invalid=True, report=report)
    assert report.n_read == 1_000 and len(loaded) == 998 and len(report.skipped) == 2
    assert [e.record for e in report.skipped] == [534, 723]


def test_counterfact_fields(data_root):
    first = data.load_counterfact("edit")[0]
    assert first.case_id == 0 and first.subject == "Danielle Darrieux"
    assert first.target_new == "English" and first.target_true == "French"
    assert first.prompt_template.format(first.subject) == first.prompt
    assert first.locality_prompts == ("Michel Rocard is a native speaker of",)
    assert first.locality_answers == ("French",)


def test_task_examples(data_root):
    rte = data.load_rte()
    assert rte[0].entailment is False and rte[1].entailment is True
    assert sum(e.entailment for e in data.load_rte(split="dev")) == 131  # balanced dev set
    sst = data.load_sst2()
    assert sst[0].positive and not sst[1].positive
    nq = data.load_nq()[0]
    assert nq.answers == ("Wilhelm Conrad Röntgen",) and nq.passage.startswith("The first Nobel Prize")
    assert data.load_mmlu()[0].answer == 0
    paragraphs = data.text_paragraphs(data.load_text("wikitext-test"))
    assert paragraphs and not any(p.startswith("= ") and p.endswith(" =") for p in paragraphs)
    assert "Robert Boulter is an English film , television and theatre actor ." in paragraphs[0]


def _write(tmp_path, records, name="cf.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


GOOD = {"case_id": 7, "prompt": "The capital of {X} is", "subject": "{X}", "target_new": "Rome",
        "ground_truth": "Paris", "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "a"}


@pytest.mark.parametrize("field,value,problem", [
    ("target_new", "", "empty"),
    ("target_new", "   ", "empty"),
    ("subject", "Nowhere", "does not occur"),
    ("locality_prompt", None, "missing"),
])
def test_bad_counterfact_record_names_file_record_and_field(tmp_path, field, value, problem):
    bad = dict(GOOD, case_id=8)
    if value is None:
        del bad[field]
    else:
        bad[field] = value
    path = _write(tmp_path, [GOOD, bad])
    with pytest.raises(data.DataError) as info:
        data.load_counterfact(path=path)
    message = str(info.value)
    assert str(path) in message and "record 8" in message and repr(field) in message and problem in message
    report = data.LoadReport(str(path))
    kept = data.load_counterfact(path=path, skip_invalid=True, report=report)
    assert [r.case_id for r in kept] == [7] and report.n_read == 2 and len(report.skipped) == 1
    assert "1 skipped" in report.summary()


def test_prompt_template_escapes_literal_braces(tmp_path):
    request = data.load_counterfact(path=_write(tmp_path, [GOOD]))[0]
    assert request.prompt_template.format(request.subject) == request.prompt


def test_broken_json_line_is_named(tmp_path):
    path = tmp_path / "mmlu.jsonl"
    path.write_text('{"question": "q", "choices": ["a","b","c","d"], "answer": 1}\n{oops\n')
    with pytest.raises(data.DataError, match="line 2"):
        data.load_mmlu(path=path)


def test_missing_file_names_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("EAC_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        data.load_sst2(data_root=tmp_path)


ORIGINAL_SCHEMA = [{
    "case_id": 0,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
    "paraphrase_prompts": ["Shayna does this. Danielle Darrieux's mother tongue is"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is", "The native language of Montesquieu is"],
}]


def test_download_when_absent_from_a_loopback_server(tmp_path, monkeypatch):
    monkeypatch.delenv("EAC_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    served = tmp_path / "served"
    served.mkdir()
    (served / "counterfact.json").write_text(json.dumps(ORIGINAL_SCHEMA))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        root = tmp_path / "data"
        url = f"http://127.0.0.1:{server.server_address[1]}/counterfact.json"
        requests = data.load_counterfact("full", data_root=root, url=url)
        assert (root / "counterfact" / "counterfact.json").exists()
        assert not list(root.rglob("*.partial"))
        with pytest.raises(FileNotFoundError, match="failed"):
            data.load_zsre("mem-eval", data_root=root, url=url.replace("counterfact.json", "absent.json"))
        assert not (root / "zsre" / "zsre_mem-eval.json").exists()
    finally:
        server.shutdown()
    request = requests[0]
    assert request.prompt == "The mother tongue of Danielle Darrieux is"
    assert request.target_new == "English" and request.target_true == "French"
    assert request.locality_prompts[1] == "The native language of Montesquieu is"
    assert request.locality_answers == ("French", "French")


def test_one_table_of_data_sets_is_what_the_spec_the_data_check_the_tasks_and_the_driver_read(
        tmp_path, monkeypatch, capsys, data_root, tiny_gpt2):
    """Moving a data set in ``data.DATASETS`` moves it for every reader: the spec's file check,
    ``eac data check``, ``TaskSuite.load`` and the edit requests the driver loads."""
    from orchestrator import cli
    from orchestrator.spec import SpecError, spec_from_dict
    from workers.evaluation import EvalConfig, TaskSuite

    moved = tmp_path / "three.tsv"
    moved.write_text("sentence\tlabel\na fine film \t1\na dull film \t0\nan odd film \t1\n")
    sst2 = data.DATASETS["sst2"]
    monkeypatch.setitem(data.DATASETS, "sst2", data.DataSet("sst2", "tasks/moved-sst2.tsv", "task",
                                                            functools.partial(data.load_sst2, path=moved),
                                                            sst2.record))
    spec = {"experiment": "e", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": ["counterfact"],
            "n_edits": 2, "evaluation": {"tasks": {"sst2": 2}}}
    with pytest.raises(SpecError, match="moved-sst2.tsv") as error:
        spec_from_dict(spec, check_models=False)
    assert error.value.field == "evaluation.tasks.sst2"

    assert cli.main(["data", "check", "--skip-invalid"]) == 0
    assert f"sst2                 {moved}: 3 of 3 records loaded" in capsys.readouterr().out

    _, tokenizer = tiny_gpt2
    suite = TaskSuite.load(tokenizer, EvalConfig(tasks={"sst2": 3}, progress=False), data_root)
    assert [x.text for x in suite.examples["sst2"]] == ["a fine film", "a dull film", "an odd film"]

    requests = [data.EditRequest(7, "The capital of X is", "X", " Y")]
    monkeypatch.setitem(data.DATASETS, "zsre", data.DataSet("zsre", "zsre/other.json", "edit",
                                                            lambda root, **options: requests, data.EditRequest))
    assert data.load_edit_dataset("zsre", data_root) is requests  # what the driver's plan loads

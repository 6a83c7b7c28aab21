"""Issues 12 and 36: every bad input of `eac run` — spec, edit data file, saved edit log, store,
cluster address — and of `eac eval` — config, model directory, data, edit log, options — is one line
on stderr naming the file (or option), exit status 2, before Ray starts and with nothing written to
the store. Seeded: each case draws its malformation (which field, which bytes, where a file is cut)
from its own seed, so a failure names a case that replays exactly."""

import json
import random
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator import driver as driver_module
from orchestrator.driver import Driver
from orchestrator.spec import load_spec
from orchestrator.store import Store
from log_tampering import reheadered
from read_only import read_only
from workers.editing.delta import EditLog

N_CASES = 120
RECORD = {"prompt": "The capital of France is", "subject": "France", "target_new": "Rome",
          "ground_truth": "Paris", "rephrase_prompt": "France's capital is", "locality_prompt": "Spain's capital is",
          "locality_ground_truth": "Madrid"}
SPEC = {"experiment": "fuzz", "models": ["tiny-gpt2"], "methods": ["rome"], "datasets": ["edits.json"],
        "n_edits": 2, "checkpoints": [0, 1, 2], "selection": "first", "evaluation": {"tasks": {"wikitext": 1}},
        "resources": {"trajectory": {"num_cpus": 1}, "evaluation": {"num_cpus": 1, "actors": 1}}}
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8))


def records(n=3):
    return [{"case_id": i, **RECORD} for i in range(n)]


# ---- spec malformations: (rng) -> the spec file's bytes ----

def bad_value(rng):
    field, values = rng.choice([
        ("n_edits", [-1, 0, "two", 2.5, float("nan"), 10**9]), ("batch_size", [0, -3, "1", 3]),
        ("seeds", [[1, 1], [-1], ["a"]]), ("dtype", ["int8", 3]), ("selection", ["all", None]),
        ("checkpoints", [{"every": 0}, [5], [-1], {"each": 1}, {"every": 1, "x": 2}]),
        ("models", [[], [""], ["tiny-gpt2", "tiny-gpt2"], ["no-such-model"]]),
        ("methods", [["rome-eca"], [{"method": "rome", "name": "../up"}], [{"name": "x"}]]),
        ("experiment", ["../escape", "a" * 300, "", "a/b", 7]),
        ("resources", [{"trajectory": {"num_cpus": float("nan")}}, {"trajectory": {"num_cpus": -1}},
                       {"evaluation": {"actors": 0}}, {"gpus": 1}]),
        ("evaluation", [{"tasks": {"wikitext": 0}}, {"tasks": {"nope": 1}}, {"edit_sample": -1}, {"bogus": 1}]),
        ("hparams", [{"memit": {"layers": [1]}}, {"rome": {"no_such_field": 1}}, {"nope": {}}]),
        ("max_restarts", [-1, "x"]), ("store", ["", 5]),
    ])
    return yaml.safe_dump({**SPEC, field: rng.choice(values)}).encode()


def bad_hparams(rng):
    """Hyper-parameter values of the wrong type or out of range (they used to reach the actors)."""
    method, name, value = rng.choice([
        ("rome", "lr", "fast"), ("rome", "lr", float("nan")), ("rome", "num_steps", -3), ("rome", "layer", 999),
        ("rome", "layer", -1), ("rome", "context_template_lengths", [[5, "x"]]), ("memit", "layers", [1, 99]),
        ("rome-eac", "eac.gamma_percentile", 500), ("rome-eac", "eac.score", "best"),
        ("rome-eac", "eac.elastic_net", "no"), ("rome-eac", "eac", 5), ("ft-l", "objective", "nll")])
    return yaml.safe_dump({**SPEC, "methods": [method], "hparams": {method: {name: value}}}).encode()


def bad_evaluation_value(rng):
    name, value = rng.choice([("drift_examples", -1), ("seed", "x"), ("batch_size", 0), ("pca_folds", 1),
                              ("perplexity_window", 0.5)])
    return yaml.safe_dump({**SPEC, "evaluation": {**SPEC["evaluation"], name: value}}).encode()


def huge_checkpoint_list(rng):
    return yaml.safe_dump({**SPEC, "n_edits": 10**12, "checkpoints": {"every": rng.randint(1, 1000)}}).encode()


def unknown_field(rng):
    return yaml.safe_dump({**SPEC, f"field{rng.randint(0, 99)}": 1}).encode()


def alias_bomb(rng):
    return (yaml.safe_dump(SPEC) + "hparams:\n  rome:\n" + "".join(
        "    " + line + "\n" for line in ALIAS_BOMB.splitlines())).encode()


def not_utf8(rng):
    text = yaml.safe_dump(SPEC).encode()
    at = rng.randrange(len(text))
    return text[:at] + bytes([rng.randint(0x80, 0xff)]) + b"\xfe" + text[at:]


def duplicate_key(rng):
    """A key given twice (YAML loaders silently keep the later value)."""
    key = rng.choice(["n_edits", "batch_size", "experiment", "selection"])
    return (yaml.safe_dump(SPEC) + f"{key}: {yaml.safe_dump(SPEC.get(key, 1)).splitlines()[0]}\n").encode()


def cut_yaml(rng):
    return rng.choice([b"experiment: [unclosed\n", b"- a\n- b\n", b"42\n", b"key: value\n  bad indent: - x\n",
                       b"{experiment: fuzz, models: [tiny-gpt2"])


# ---- data-file malformations: (rng) -> the edit data file's bytes ----

def data_bad_record(rng):
    rows = records()
    row = rows[rng.randrange(len(rows))]
    field, value = rng.choice([("prompt", 5), ("subject", "Germany"), ("target_new", ""), ("target_new", None),
                               ("case_id", None), ("case_id", True), ("case_id", [1]), ("ground_truth", 3.5)])
    row[field] = value
    return json.dumps(rows).encode()


def data_duplicate_ids(rng):
    rows = records()
    rows[2]["case_id"] = rows[rng.randrange(2)]["case_id"]
    return json.dumps(rows).encode()


def data_rome_schema(rng):
    rewrite = {"prompt": "The capital of {} is", "subject": "France", "target_new": {"str": "Rome"},
               "target_true": {"str": "Paris"}}
    change = rng.choice([("target_new", "Rome"), ("target_true", "Paris"), ("prompt", "no slot")])
    row = {"case_id": 0, "requested_rewrite": {**rewrite, change[0]: change[1]},
           "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["Spain's capital is"]}
    if rng.random() < 0.5:
        row = {"case_id": 0, "requested_rewrite": rewrite, rng.choice(["paraphrase_prompts", "neighborhood_prompts"]):
               rng.choice(["a string, not a list", [1, 2], [""]])}
    return json.dumps([row, row | {"case_id": 1}, row | {"case_id": 2}]).encode()


def data_zsre_answers(rng):
    row = {"src": "When was France founded?", "subject": "France", "alt": "1998", "rephrase": "France founded in?",
           "loc": "nq question: who?", "loc_ans": "me", "answers": rng.choice(["1998", [1998], [None]])}
    return json.dumps([{**row, "case_id": i} for i in range(3)]).encode()


def data_not_records(rng):
    return rng.choice([b"[1, 2, 3]", b"{\"a\": 1}", b"[\"x\", \"y\", \"z\"]", b"[[1], [2], [3]]", b"\"text\""])


def data_nested_deep(rng):
    depth = rng.randint(5_000, 50_000)
    return ("[" * depth + "]" * depth).encode() if rng.random() < 0.5 else (
        '[{"case_id": 0, "prompt": ' + "[" * depth + "]" * depth + "}]").encode()


def data_prompt_too_long(rng):
    """A prompt longer than the model's context (tiny-gpt2: 256 tokens), or one of megabytes."""
    rows = records()
    words = rng.choice([rng.randint(300, 2000), rng.randint(200_000, 400_000)])
    rows[rng.randrange(SPEC["n_edits"])]["prompt"] = "The capital of France is" + " very" * words  # an edited one
    return json.dumps(rows).encode()


def data_broken_bytes(rng):
    text = json.dumps(records()).encode()
    if rng.random() < 0.5:
        return text[: rng.randrange(1, len(text) - 1)]  # cut short
    at = rng.randrange(len(text))
    return text[:at] + b"\xff\xfe" + text[at:]


# ---- saved edit logs: (rng, the log's valid bytes) -> the log's bytes ----

def log_garbage(rng, valid):
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))


def log_truncated(rng, valid):
    return valid[: rng.randrange(1, len(valid) - 1)]


def log_header_lies(rng, valid):
    size = int.from_bytes(valid[:8], "little")
    return (size + rng.randint(1, 10**6)).to_bytes(8, "little") + valid[8:]


def log_other_requests(rng, valid):
    return None  # built in the test: a well-formed log bound to other requests


def log_tensors_changed(rng, valid):
    """Issue 36 item 1: tensors scaled, negated or nudged by one ulp-ish step, header intact."""
    factor = rng.choice([50.0, -1.0, 1.0 + 1e-6, 0.0])
    name = rng.choice(["0.0.left", "0.0.right"])
    return reheadered(valid, tensors=lambda t: t.update({name: t[name] * factor}))


def log_metadata_changed(rng, valid):
    """Issue 36 item 1: steps_done, delta_steps or requests_done edited, digest kept."""
    change = rng.choice([lambda m: m.update(steps_done=m["steps_done"] + rng.randint(1, 5)),
                         lambda m: m.update(delta_steps=[rng.randint(1, 9)]),
                         lambda m: m.update(requests_done=rng.randint(2, 99))])
    return reheadered(valid, metadata=change)


def log_data_cut(rng, valid):
    """Issue 36 item 1: cut inside the tensor data, its header whole (only the header used to be read)."""
    start = 8 + int.from_bytes(valid[:8], "little")
    return valid[: rng.randrange(start, len(valid) - 1)]


SPEC_CASES = [bad_value, bad_value, bad_value, bad_hparams, bad_hparams, bad_evaluation_value, huge_checkpoint_list,
              unknown_field, alias_bomb, not_utf8, cut_yaml, duplicate_key]
DATA_CASES = [data_bad_record, data_duplicate_ids, data_rome_schema, data_zsre_answers, data_not_records,
              data_broken_bytes, data_nested_deep, data_prompt_too_long]
LOG_CASES = [log_garbage, log_truncated, log_header_lies, log_other_requests, log_tensors_changed,
             log_metadata_changed, log_data_cut]


def store_read_only(rng):
    return None  # the store directory, made read-only in the test


# ---- the store's layout (issue 36 item 2): (rng, store, experiment, trajectory id) -> the path named ----

def store_file_for_directory(rng, store, experiment, trajectory_id):
    """A file where the store keeps a directory: a table's experiment directory, or locks/."""
    path = store / rng.choice(["trajectories", "edits", "evaluations"]) / experiment
    path.parent.mkdir(parents=True)
    path.write_text("not a directory")
    return path


def store_directory_for_file(rng, store, experiment, trajectory_id):
    """A directory where a file belongs: the resume log."""
    path = store / "logs" / experiment / f"{trajectory_id}.safetensors"
    path.mkdir(parents=True)
    return path


def store_wrong_types(rng, store, experiment, trajectory_id):
    """Issue 36 item 4: an edits file whose columns have the wrong types (edit_index as strings)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store import edit_row

    first = Path(Store(store).put_edits(experiment, trajectory_id, [edit_row({"edit_index": 0, "case_id": 0})]))
    table = pq.read_table(first)
    column = rng.choice(["edit_index", "n_requests"])
    table = table.set_column(table.schema.get_field_index(column), column,
                             pa.array([str(v) for v in table.column(column).to_pylist()]))
    pq.write_table(table, first)
    return first


def store_foreign_file(rng, store, experiment, trajectory_id):
    """Issue 36 item 4: a foreign Parquet file, or a text file named .parquet, under a name no
    trajectory owns (the plan read only its trajectories' files; the report read it at the end)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = store / rng.choice(["trajectories", "edits", "evaluations"]) / experiment / f"notes{rng.randint(0, 9)}.parquet"
    path.parent.mkdir(parents=True)
    if rng.random() < 0.5:
        path.write_text("a text file, named like a table's")
    else:
        pq.write_table(pa.table({"x": [1, 2]}), path)
    return path


STORE_LAYOUT_CASES = [store_file_for_directory, store_directory_for_file, store_wrong_types, store_foreign_file]
STORE_CASES = [store_read_only, *STORE_LAYOUT_CASES]


# ---- cluster addresses (issue 36 items 2 and 3): (rng) -> the --address given ----

def address_unusable(rng):
    return rng.choice(["garbage", "ray://127.0.0.1:10001", "127.0.0.1:1", "localhost:99999", "host:port", ":6379",
                       f"127.0.0.1:{rng.randint(2, 20)}", "nohost.invalid:6379"])


ADDRESS_CASES = [address_unusable]
ALL = SPEC_CASES + DATA_CASES + LOG_CASES + STORE_CASES + ADDRESS_CASES


@pytest.fixture
def no_ray(monkeypatch):
    for name in ("init", "remote"):
        monkeypatch.setattr(driver_module.ray, name, lambda *a, **k: pytest.fail("Ray was used"), raising=False)
    monkeypatch.setattr(driver_module.TrajectoryActor, "options", lambda **kw: pytest.fail("an actor started"))
    monkeypatch.setattr(driver_module.EvalActor, "options", lambda **kw: pytest.fail("an actor started"))


def valid_log(spec_path, store_root, data_root) -> tuple[str, bytes]:
    """Where the plan's one trajectory keeps its log, and a well-formed log of one step for it (a
    rank-one update of layer 0 of tiny-gpt2)."""
    import torch

    from workers.editing.delta import LayerDelta, WeightDelta, log_binding

    driver = Driver(load_spec(spec_path), Store(store_root), progress=False, data_root=data_root)
    (trajectory,) = driver.plan()
    binding = log_binding(trajectory.task.requests, trajectory.spec.resolved_hparams)
    delta = WeightDelta([LayerDelta("transformer.h.0.mlp.c_proj", torch.full((64, 1), 0.01), torch.ones(256, 1))],
                        [trajectory.task.requests[0].case_id], "rome")
    log = EditLog([delta], metadata={"steps_done": 1, "delta_steps": [0], "requests_done": 1, "binding": binding})
    return trajectory.task.log_path, log


@pytest.mark.parametrize("seed", range(N_CASES))
def test_bad_input_is_one_line_naming_the_file_exit_2_before_ray(seed, tmp_path, data_root, no_ray, capsys):
    rng = random.Random(seed)
    malform = ALL[seed % len(ALL)]
    spec_path, data_path, store = tmp_path / "spec.yaml", tmp_path / "edits.json", tmp_path / "store"
    spec_path.write_text(yaml.safe_dump(SPEC))
    data_path.write_text(json.dumps(records()))
    named, placed, guard, extra = None, set(), nullcontext(), []
    if malform is store_read_only:
        store.mkdir()
        named, guard = store, read_only(store)
    elif malform in STORE_LAYOUT_CASES:
        (trajectory,) = Driver(load_spec(spec_path), Store(store), progress=False, data_root=data_root).plan()
        named = malform(rng, store, "fuzz", trajectory.trajectory_id)
        placed = {p for p in store.rglob("*")}
    elif malform in ADDRESS_CASES:
        named = malform(rng)
        extra = ["--address", named, "--connect-timeout", "2"]
    elif malform in SPEC_CASES:
        spec_path.write_bytes(malform(rng))
        named = spec_path
    elif malform in DATA_CASES:
        data_path.write_bytes(malform(rng))
        named = data_path
    else:
        log_path, log = valid_log(spec_path, store, data_root)
        if malform is log_other_requests:
            from workers.editing.delta import log_binding

            from workers.data import EditRequest

            others = [EditRequest(i, RECORD["prompt"], RECORD["subject"], "Berlin") for i in range(rng.randint(1, 3))]
            log.metadata["binding"] = log_binding(others, {"x": rng.random()})
            log.save(log_path)
        else:
            log.save(log_path)
            with open(log_path, "rb") as handle:
                valid = handle.read()
            with open(log_path, "wb") as handle:
                handle.write(malform(rng, valid))
        named = log_path
        placed = {p for p in store.rglob("*")}
    with guard:
        assert_refused(["run", str(spec_path), "--store", str(store), "--no-report", "--no-progress", *extra], named,
                       store, placed, capsys, malform.__name__)


def assert_refused(argv, named, store, placed, capsys, case):
    """The command exits 2 with one line on stderr naming ``named``, and writes nothing to ``store``
    beyond the files ``placed`` there before it ran."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # a usage error: argparse exits itself
        code = exc.code
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, (case, captured.err)
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert str(named) in lines[0], (case, lines[0])
    assert {p for p in store.rglob("*")} == placed if store.exists() else not placed


# Each input that issue 12 lists (items 4 and 6) once, by name, so that none is left to the seeds' draw.
ROME_ROW = {"case_id": 0, "requested_rewrite": {"prompt": "The capital of {} is", "subject": "France",
                                                "target_new": {"str": "Rome"}, "target_true": {"str": "Paris"}},
            "paraphrase_prompts": ["France's capital is"], "neighborhood_prompts": ["Spain's capital is"]}
ZSRE_ROW = {"case_id": 0, "src": "When was France founded?", "subject": "France", "alt": "1998",
            "rephrase": "France founded in?", "loc": "nq question: who?", "loc_ans": "me", "answers": ["1998"]}


def three(row: dict, **changes) -> bytes:
    return json.dumps([{**row, **changes, "case_id": i} for i in range(3)]).encode()


LISTED = {
    "spec not UTF-8": ("spec", yaml.safe_dump(SPEC).encode() + b"# \xff\xfe\n"),
    "num_cpus: .nan": ("spec", yaml.safe_dump(SPEC).encode().replace(b"num_cpus: 1\n", b"num_cpus: .nan\n", 1)),
    "data not UTF-8": ("data", json.dumps(records()).encode().replace(b"Rome", b"R\xffme")),
    "data a list of numbers": ("data", b"[1, 2, 3]"),
    "ROME schema target_new a string": ("data", three(ROME_ROW, requested_rewrite={
        **ROME_ROW["requested_rewrite"], "target_new": "Rome"})),
    "paraphrase_prompts a string": ("data", three(ROME_ROW, paraphrase_prompts="France's capital is")),
    "zsRE answers a string": ("data", three(ZSRE_ROW, answers="1998")),
    "integer prompt": ("data", json.dumps([{**r, "prompt": 5} if r["case_id"] == 1 else r for r in records()]).encode()),
    "duplicate case ids": ("data", json.dumps([{**r, "case_id": 0} for r in records()]).encode()),
    "null case id": ("data", json.dumps([{**r, "case_id": None} if r["case_id"] == 2 else r
                                         for r in records()]).encode()),
    "garbage edit log": ("log", b"\x00" * 7),
    "truncated edit log": ("log", None),
    "store file of a foreign schema": ("store", "foreign"),
    "stray copy of an edits file": ("store", "copy"),
}


@pytest.mark.parametrize("case", LISTED)
def test_each_listed_bad_input_is_refused_at_the_door(case, tmp_path, data_root, no_ray, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from orchestrator.store import edit_row

    where, content = LISTED[case]
    spec_path, data_path, store = tmp_path / "spec.yaml", tmp_path / "edits.json", tmp_path / "store"
    spec_path.write_text(yaml.safe_dump(SPEC))
    data_path.write_bytes(content if where == "data" else json.dumps(records()).encode())
    named = data_path if where == "data" else spec_path
    if where == "spec":
        spec_path.write_bytes(content)
    elif where == "log":
        named, log = valid_log(spec_path, store, data_root)
        log.save(named)
        with open(named, "rb") as handle:
            valid = handle.read()
        with open(named, "wb") as handle:
            handle.write(content if content is not None else valid[: len(valid) // 2])
    elif where == "store":
        (trajectory,) = Driver(load_spec(spec_path), Store(store), progress=False, data_root=data_root).plan()
        first = Path(Store(store).put_edits("fuzz", trajectory.trajectory_id, [edit_row({"edit_index": 0,
                                                                                        "case_id": 0})]))
        named = first.with_name(first.name.replace("-000000-000000", "-000001-000001"))
        if content == "foreign":
            pq.write_table(pa.table({"experiment": ["fuzz"], "trajectory_id": [trajectory.trajectory_id]}), named)
        else:
            named = first.with_name(first.name.replace("-000000-000000", "-copy"))
            shutil.copy(first, named)
    placed = {p for p in store.rglob("*")}
    assert_refused(["run", str(spec_path), "--store", str(store), "--no-report", "--no-progress"], named, store,
                   placed, capsys, case)


@pytest.mark.parametrize("cut", [False, True])
def test_eac_eval_refuses_a_garbage_or_truncated_edit_log_before_loading_the_model(cut, tmp_path, capsys):
    log_path, data_path = tmp_path / "log.safetensors", tmp_path / "edits.json"
    data_path.write_text(json.dumps(records()))
    EditLog(metadata={"steps_done": 0}).save(log_path)
    valid = log_path.read_bytes()
    log_path.write_bytes(valid[: len(valid) - 3] if cut else b"not a log at all")
    assert_refused(["eval", "--model", "tiny-gpt2", "--edit-log", str(log_path), "--dataset", str(data_path)],
                   log_path, tmp_path / "store", set(), capsys, "eval")


# ---- `eac eval` (issue 36 items 2 and 4): (rng, directory, a model directory) -> (argv changes, named) ----

def eval_config_broken(rng, directory, model_dir):
    path = directory / "eval.yaml"
    path.write_bytes(rng.choice([b"tasks: {wikitext: 1\n", b"seed: !!python/object/apply:os.system [true]\n",
                                 b"seed: 1\nseed: 2\n", b"tasks:\n  wikitext: 1\n  wikitext: 2\n", b"[" * 5000]))
    return ["--config", str(path)], path


def eval_model_broken(rng, directory, model_dir):
    """A model directory with truncated safetensors, a config.json that is not JSON, pickled weights
    only, or NaN/inf weights."""
    import torch
    from safetensors.torch import load_file, save_file

    path = directory / "model"
    shutil.copytree(model_dir, path)
    weights = path / "model.safetensors"
    kind = rng.choice(["cut", "config", "pickle", "nan"])
    if kind == "cut":
        data = weights.read_bytes()
        weights.write_bytes(data[: rng.randrange(1, len(data) - 1)])
    elif kind == "config":
        (path / "config.json").write_text(rng.choice(["{not json", "", "[" * 5000]))
    elif kind == "pickle":
        torch.save(load_file(weights), path / "pytorch_model.bin")
        weights.unlink()
    else:
        tensors = load_file(weights)
        name = rng.choice(sorted(n for n, t in tensors.items() if t.is_floating_point()))
        tensors[name].view(-1)[rng.randrange(tensors[name].numel())] = rng.choice([float("nan"), float("inf")])
        save_file(tensors, weights, metadata={"format": "pt"})
    return ["--model", str(path)], path


def eval_data_nested(rng, directory, model_dir):
    path = directory / "nested.json"
    path.write_bytes(data_nested_deep(rng))
    return ["--dataset", str(path)], path


def eval_log_is_a_directory(rng, directory, model_dir):
    path = directory / "log.safetensors"
    path.mkdir()
    return ["--edit-log", str(path)], path


def eval_log_nested_header(rng, directory, model_dir):
    path = directory / "nested.safetensors"
    header = b'{"__metadata__": {"format": "eac-edit-log/2"}, "x": ' + b"[" * 20000 + b"]" * 20000 + b"}"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return ["--edit-log", str(path)], path


def eval_bad_option(rng, directory, model_dir):
    option, value = rng.choice([("--threads", "-1"), ("--threads", "0"), ("-n", "-3"), ("-n", "0"), ("-n", "x")])
    return [option, value], option


def eval_json_a_directory(rng, directory, model_dir):
    path = directory / "rows"
    path.mkdir()
    return ["--json", str(path)], path


EVAL_CASES = [eval_config_broken, eval_model_broken, eval_data_nested, eval_log_is_a_directory, eval_log_nested_header,
              eval_bad_option, eval_json_a_directory]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from workers.models import build_tiny_model

    path = tmp_path_factory.mktemp("tiny-llama")
    model, tokenizer = build_tiny_model("tiny-llama")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("seed", range(28))
def test_bad_input_of_eac_eval_is_one_line_naming_it_exit_2(seed, tmp_path, tiny_model_dir, capsys):
    rng = random.Random(seed)
    malform = EVAL_CASES[seed % len(EVAL_CASES)]
    data_path = tmp_path / "edits.json"
    data_path.write_text(json.dumps(records()))
    argv = {"--model": "tiny-gpt2", "--dataset": str(data_path), "--tasks": "wikitext=1", "-n": "1"}
    changes, named = malform(rng, tmp_path, tiny_model_dir)
    for option, value in zip(changes[::2], changes[1::2]):
        argv[option] = value
    argv = ["eval", *[part for pair in argv.items() for part in pair]]
    assert_refused(argv, named, tmp_path / "store", set(), capsys, malform.__name__)


def test_a_completed_experiment_in_a_read_only_store_is_refused_before_the_report(tmp_path, data_root, no_ray,
                                                                                      capsys):
    """Issue 36 item 2: `eac run` on completed work in a read-only store crashed writing the report."""
    from orchestrator.driver import write_status
    from orchestrator.status import Status
    from orchestrator.store import edit_row

    spec_path, store = tmp_path / "spec.yaml", tmp_path / "store"
    (tmp_path / "edits.json").write_text(json.dumps(records()))
    spec_path.write_text(yaml.safe_dump(SPEC))
    (trajectory,) = Driver(load_spec(spec_path), Store(store), progress=False, data_root=data_root).plan()
    done = Store(store)
    done.put_edits("fuzz", trajectory.trajectory_id, [edit_row({"edit_index": i, "case_id": i}) for i in range(2)])
    for checkpoint in trajectory.spec.checkpoints:
        done.put_evaluations("fuzz", trajectory.trajectory_id, checkpoint,
                             [{"task": "wikitext", "metric": "perplexity", "value": 1.0, "n_examples": 1}])
    write_status(done, trajectory, Status.COMPLETED)
    placed = {p for p in store.rglob("*")}
    with read_only(store):
        assert_refused(["run", str(spec_path), "--store", str(store), "--no-progress"], store, store, placed,
                       capsys, "read-only completed")
    assert cli.main(["run", str(spec_path), "--store", str(store), "--no-progress", "--no-report"]) == 0

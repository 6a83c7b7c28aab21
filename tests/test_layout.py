"""The package layout's rules, read off the source: the orchestrator does not import the figures
(except the CLI, which wires ``eac report`` to them), and no module reaches into another's private
(leading-underscore) names."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "workers", "experiments")


def sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST) -> list[str]:
    """Every module an ``import`` or ``from … import`` names, at any depth (local imports too)."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def is_project_module(name: str) -> bool:
    return name.split(".")[0] in PACKAGES and importlib.util.find_spec(name) is not None


def dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attribute reads on a name, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def private_uses(path: Path) -> set[tuple[str, str]]:
    """(file, dotted name) for each private name of another project module that ``path`` imports or
    reads: ``from m import _x``, ``m._x`` and ``m.Class._x`` through a name bound to module m."""
    tree = ast.parse(path.read_text(), str(path))
    own = module_name(path)
    where = str(path.relative_to(ROOT))
    bound: dict[str, str] = {}  # local name -> what it stands for (a module, or a class of one)
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if is_project_module(alias.name):
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] in PACKAGES and node.module != own:
            for alias in node.names:
                if is_private(alias.name):
                    uses.add((where, f"{node.module}.{alias.name}"))
                bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    defined = defined_names(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            chain = dotted(node)
            if chain is None:
                continue
            head, _, rest = chain.partition(".")
            if head in bound:
                if not bound[head].startswith(own + ".") and bound[head] != own:
                    uses.add((where, f"{bound[head]}.{rest}"))
            elif head not in ("self", "cls") and node.attr not in defined:  # another module's object
                uses.add((where, chain))
    return uses


def defined_names(tree: ast.AST) -> set[str]:
    """The names a module defines: functions, classes, assigned names and attributes it assigns."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
    return names


def test_no_module_of_the_orchestrator_imports_the_experiments_except_the_cli():
    offenders = {}
    for path in sources("orchestrator"):
        if path.name == "cli.py":
            continue
        found = [name for name in imported_modules(ast.parse(path.read_text())) if name.split(".")[0] == "experiments"]
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}


# Private names of other projects that the product uses knowingly, each with its reason. PyTorch's
# oneDNN linear ops are public only through torch.compile; torch is pinned by the lock, and
# packed_linear checks they exist (``available``) and runs the plain layers otherwise. A tensor's
# in-place version counter is what keys its cache of packed weights (no public API exposes it).
KNOWN_PRIVATE = {("workers/packed_linear.py", "torch.ops.mkldnn._reorder_linear_weight"),
                 ("workers/packed_linear.py", "torch.ops.mkldnn._linear_pointwise"),
                 ("workers/packed_linear.py", "w._version")}


def test_no_private_name_is_used_outside_its_module():
    uses = set().union(*(private_uses(path) for package in PACKAGES for path in sources(package)))
    assert uses - KNOWN_PRIVATE == set()


# ---- the task registry: adding a general task is one record ------------------------------------

REGISTRY, LOADERS = "workers/evaluation/tasks.py", "workers/data.py"
# Modules that name a task for a reason of their own, not to describe it: the summary table's
# perplexity column and the check that perplexity is not scored on the statistics' text; the default
# task of the PCA view.
NAMED_ELSEWHERE = {"wikitext": {"experiments/figures.py", "workers/evaluation/prompts.py"},
                   "sst2": {"workers/evaluation/config.py"}}


def string_constants(path: Path) -> set[str]:
    """The string literals of a module, docstrings left out."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                  and ast.get_docstring(node, clean=False) is not None}
    return {node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings}


def test_a_general_task_is_named_only_by_its_record_and_its_loader():
    """Everything about a task lives in its record, so no other module of the product spells its name
    (the spec, the suite, retention, the metrics tables and the figures read the registry)."""
    from workers.evaluation.tasks import TASKS

    product = sources("orchestrator") + sources("workers") + [ROOT / "experiments" / "figures.py"]
    named = {}
    for path in product:
        where = str(path.relative_to(ROOT))
        for task in set(TASKS) & string_constants(path):
            if where not in {REGISTRY, LOADERS} | NAMED_ELSEWHERE.get(task, set()):
                named.setdefault(task, []).append(where)
    assert named == {}


def test_a_task_added_by_one_record_reaches_the_spec_the_suite_and_the_figures(tmp_path, data_root):
    """``known`` (ROME's known facts) was added as one record and its loader: a spec asks for it, the
    suite samples and prompts it, the evaluation scores it (and its retention), the report draws it."""
    from experiments.figures import TASK_TITLES, build_report
    from orchestrator.spec import spec_from_dict
    from orchestrator.store import Store
    from workers.evaluation import TaskSuite, evaluate_checkpoint
    from workers.evaluation.tasks import TASKS
    from workers.models import context_length, load_model

    spec = spec_from_dict({"experiment": "known-facts", "models": ["tiny-gpt2"], "methods": ["rome"],
                           "datasets": ["counterfact"], "n_edits": 1, "evaluation": {"tasks": {"known": 3}}},
                          data_root=data_root)
    config = spec.evaluation.config
    assert config.count("known") == 3 and config.max_new_tokens["known"] == TASKS["known"].max_new_tokens
    model, tokenizer = load_model("tiny-gpt2")
    suite = TaskSuite.load(tokenizer, config, data_root, context_length=context_length(model))
    assert [fact.prompt for fact in suite.examples["known"]] == suite.prompts["known"] and len(suite.prompts["known"]) == 3
    rows = evaluate_checkpoint(model, tokenizer, None, [], config, tasks=suite, data_root=data_root)
    known = {row.metric: row for row in rows if row.task == "known"}
    assert known["recall"].n_examples == 3 and 0 <= known["recall"].value <= 1
    assert {"retention/recall", "retention_dropped/recall"} & set(known)  # retention, or why there is none

    store = Store(tmp_path / "store")
    (trajectory,) = spec.trajectories()
    store.put_trajectory({"experiment": spec.experiment, "trajectory_id": trajectory.trajectory_id,
                          "model": "tiny-gpt2", "method": "rome", "variant": "rome", "group": None,
                          "dataset": "counterfact", "seed": 0, "n_edits": 1, "batch_size": 1, "hparams": "{}",
                          "config": "{}", "status": "completed", "edits_done": 1, "updated_at": None})
    for n_edits in (0, 1):
        store.put_evaluations(spec.experiment, trajectory.trajectory_id, n_edits, [row.as_dict() for row in rows])
    text = build_report(store.root).read_text()
    assert TASK_TITLES["known"] == TASKS["known"].title
    general = text.split("### Fig. 10 — general tasks vs number of edits")[1].split("### ")[0]
    assert "| known recall |" in general  # drawn with the general tasks


# ---- constraints wrap the base methods; one per-edit record -------------------------------------

def project_imports(module: str) -> set[str]:
    """The project modules ``module`` imports (its file's imports, at any depth in it)."""
    spec = importlib.util.find_spec(module)
    tree = ast.parse(Path(spec.origin).read_text())
    return {name for name in imported_modules(tree) if is_project_module(name)}


def reachable(module: str) -> set[str]:
    """Every project module that importing ``module`` reads, through its own imports and theirs."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        todo += sorted(project_imports(current))
    return seen - {module}


def test_no_base_method_module_imports_a_constraint_module():
    """Constraints wrap the bases through the registry's hooks (methods.Constraint): the module of
    every base method's step, and everything it imports, never imports a constraint's module."""
    from workers.editing.methods import BASES, CONSTRAINTS

    constraint_modules = {hook.__module__ for constraint in CONSTRAINTS.values()
                          for hook in (constraint.optimise, constraint.rewrite) if hook is not None}
    assert {"workers.editing.eac", "workers.editing.prune", "workers.editing.rect"} <= constraint_modules
    base_modules = {hook.__module__ for method in BASES.values() for hook in (method.apply, method.on_resume)
                    if hook is not None}
    assert {"workers.editing.rome", "workers.editing.memit", "workers.editing.alphaedit",
            "workers.editing.ft"} <= base_modules
    offenders = {base: sorted(reachable(base) & constraint_modules) for base in sorted(base_modules)}
    assert offenders == {base: [] for base in sorted(base_modules)}


def test_the_edits_schema_is_derived_from_the_edit_record():
    """One per-edit record (workers/editing/record.py): every field of EditRecord is a column of the
    store's edits table, the table has no column the record does not give, and store.py spells no
    field's name in the functions that make the schema and the rows, but the two fields split in two."""
    import dataclasses

    from orchestrator import store
    from workers.editing.record import EditRecord, StepInfo, StepMeasures

    assert issubclass(StepInfo, StepMeasures) and issubclass(EditRecord, StepMeasures)
    record_fields = [item.name for item in dataclasses.fields(EditRecord)]
    expected = {"experiment", "trajectory_id", "extra"}
    for name in record_fields:
        expected |= {column for column, _ in store.SPLIT_FIELDS[name]} if name in store.SPLIT_FIELDS else {name}
    assert set(store.SCHEMAS["edits"].names) == expected
    assert store.SCHEMAS["edits"] == store.edits_schema()
    derivers = [node for node in ast.walk(ast.parse(Path(store.__file__).read_text()))
                if isinstance(node, ast.FunctionDef) and node.name in ("edits_schema", "edit_row")]
    assert len(derivers) == 2
    spelled = {node.value for function in derivers for node in ast.walk(function)
               if isinstance(node, ast.Constant) and isinstance(node.value, str)}
    assert spelled & set(record_fields) <= set(store.SPLIT_FIELDS)

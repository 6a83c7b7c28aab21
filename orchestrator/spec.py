"""Experiment specs: a YAML file → typed, validated dataclasses → the trajectories it asks for.

A spec names a grid — models × method variants × edit data sets × seeds — and what every trajectory
in it shares: how many sequential edits, the batch size, the edit counts at which to evaluate
(checkpoints), the evaluation (edit metrics and general tasks with sample counts), the resources of
each actor and hyper-parameter overrides. Everything is checked when the file is loaded, before any
actor starts; a problem raises ``SpecError`` naming the file and the field (``methods[2].method``).

``ExperimentSpec.trajectories()`` expands the grid into ``TrajectorySpec``s. A trajectory's id is a
hash of its full configuration, so a re-run of the same spec finds its finished work in the store and
skips it, and a changed setting (another γ, more examples of a task) is a new trajectory.

Example (see ``experiments/configs/demo.yaml``)::

    experiment: demo
    models: [smollm2-135m]
    methods:
      - rome
      - rome-eac
      - {name: rome-eac-random-anchors, method: rome-eac, group: anchor-selection,
         hparams: {eac.score: random}}
    datasets: [counterfact]
    seeds: [0]
    n_edits: 25
    checkpoints: [0, 5, 10, 25]        # or {every: 5}; 0 is the unedited model
    evaluation:
      tasks: {nli: 40, sst2: 40, nq: 20, samsum: 10}   # + other EvalConfig fields
    resources:
      trajectory: {num_cpus: 1, num_gpus: 0}
      evaluation: {num_cpus: 1, num_gpus: 0, actors: 1}
    hparams:                          # overrides for every variant of a method (dotted names)
      rome-eac: {eac.gamma_percentile: 85}

A variant's ``hparams`` is a mapping of overrides or the path of a YAML file holding one (e.g. the
best configuration of a Tune search); ``hparams_file`` names a complete hyper-parameter file instead
of the shipped defaults (for a model that has none). Relative paths are relative to the spec file.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from workers import settings, yaml_files
from workers.data import EDIT_DATASETS, edit_dataset_file
from workers.editing import METHODS, load_hparams
from workers.editing.hparams import with_overrides
from workers.editing.methods import BASES, split_method
from workers.evaluation import EvalConfig
from workers.evaluation.prompts import check_statistics_text
from workers.evaluation.tasks import TASKS
from workers.sampling import seeded_order
from workers.fields import FieldError, identity, is_finite_number, is_number
from workers.placement import ENGINES

SELECTIONS = ("random", "first", "disjoint")
DTYPES = ("float32", "float16", "bfloat16")
GROUPS = ("ablation", "anchor-selection")  # the ``group`` a spec's method variant may name
TUNE_GROUP = "tune"  # the ``group`` of Tune trial trajectories in the store (kept out of the paper figures)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
MAX_NAME = 120  # experiment and variant names become file and directory names (255 bytes at most)
# A spec is a page of YAML: anything far larger is a mistake or an attack (an alias bomb expands
# ×10 per level from a few hundred bytes), refused before it is built into Python objects.
MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # YAML nodes with every alias expanded
MAX_CHECKPOINTS = 10_000


class SpecError(ValueError):
    """A bad experiment spec: names the file and the field."""

    def __init__(self, source: str | Path, field_name: str, problem: str):
        self.source, self.field, self.problem = str(source), field_name, problem
        super().__init__(f"{source}: field {field_name!r}: {problem}")


# --------------------------------------------------------------------------------------------
# Typed spec


@dataclass(frozen=True)
class ActorResources:
    """What one actor asks Ray for: CPUs, GPUs (0 on CPU machines)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass(frozen=True)
class Resources:
    trajectory: ActorResources = ActorResources()
    evaluation: ActorResources = ActorResources()
    eval_actors: int = 1  # size of the evaluation pool
    max_parallel_trajectories: int | None = None  # None: as many as the cluster's resources allow
    # How each evaluation replica runs (``workers.placement.plan_evaluation_group``): "transformers" (one
    # actor), "deepspeed" (one rank per GPU) or "tp" (PyTorch tensor parallelism over ``eval_ranks``
    # ranks, on GPUs or, with num_gpus 0, on CPU). The replica's num_cpus / num_gpus are shared by its ranks.
    eval_engine: str = "transformers"
    eval_ranks: int = 1


@dataclass(frozen=True)
class MethodVariant:
    """A method as run in one trajectory: ``name`` labels it in tables and figures, ``method`` is the
    editor (one of ``METHODS``), ``hparams`` the overrides on the published defaults, ``group`` tags
    ablations and anchor-selection variants for their figures."""

    name: str
    method: str
    hparams: dict = field(default_factory=dict)
    group: str | None = None
    hparams_file: str | None = None  # a complete hyper-parameter YAML instead of the shipped defaults


@dataclass(frozen=True)
class EvaluationSpec:
    """What is scored at each checkpoint: the editing metrics on the requests edited so far (all of
    them, or a seeded sample of at most ``edit_sample``) and general tasks with sample counts.
    ``config`` is the evaluation config, typed and checked once when the spec is loaded, and shipped
    as it is to the evaluation actors; ``options`` are its fields other than ``tasks`` as the spec
    wrote them (what the trajectory id hashes, so that a new default does not rename old work)."""

    config: EvalConfig
    edit_sample: int | None = None
    options: dict = field(default_factory=dict)

    @property
    def tasks(self) -> dict[str, int]:
        """Task name -> number of examples."""
        return self.config.tasks

    def identity(self) -> dict:
        """The evaluation as the trajectory id hashes it: the tasks and options as written."""
        return {"tasks": dict(self.config.tasks), "edit_sample": self.edit_sample, "options": dict(self.options)}


@dataclass(frozen=True)
class TrajectorySpec:
    """One sequential-editing run: one model, one method variant, one data set, one seed."""

    experiment: str
    model: str
    variant: MethodVariant
    hparams: Any  # the typed hyper-parameters, resolved once with the spec: what the editor receives
    dataset: str
    seed: int
    n_edits: int
    batch_size: int
    checkpoints: tuple[int, ...]
    selection: str
    evaluation: EvaluationSpec
    resources: Resources = Resources()
    dtype: str = "float32"
    # What the trajectory edits and edits with, by content: a changed data file or other model weights
    # make a new trajectory instead of resuming onto different requests or weights.
    data_digest: str = ""
    model_fingerprint: str = ""

    @property
    def method(self) -> str:
        return self.variant.method

    def config(self) -> dict:
        """Everything that determines the trajectory's results, as plain JSON-able data — with the
        hyper-parameters the editor receives (resolved when the spec was loaded), so that new shipped
        defaults make new work, not a skip. ``hparams`` (the overrides as written) and ``evaluation``
        (the fields as written) are hashed as they always were, so that stored trajectories keep their ids."""
        return {"experiment": self.experiment, "model": self.model, "variant": self.variant.name,
                "method": self.variant.method, "hparams": self.variant.hparams, "group": self.variant.group,
                "resolved_hparams": self.resolved_hparams, "dataset": self.dataset, "seed": self.seed,
                "n_edits": self.n_edits,
                "batch_size": self.batch_size, "checkpoints": list(self.checkpoints),
                "selection": self.selection, "dtype": self.dtype, "evaluation": self.evaluation.identity(),
                "data_digest": self.data_digest, "model_fingerprint": self.model_fingerprint}

    @functools.cached_property
    def resolved_hparams(self) -> dict:
        """``hparams`` as plain JSON data (tuples as lists): what the id and the edit log's binding hash
        (``workers.fields.identity``: a setting added later counts only where it is set)."""
        return json.loads(json.dumps(identity(self.hparams)))

    @functools.cached_property
    def trajectory_id(self) -> str:
        canonical = json.dumps(self.config(), sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]

    @property
    def label(self) -> str:
        return f"{self.model}/{self.variant.name}/{self.dataset}/seed{self.seed}"

    def edit_checkpoints(self) -> tuple[int, ...]:
        """The checkpoints after at least one edit (where an edit log is saved)."""
        return tuple(c for c in self.checkpoints if c > 0)

    def evaluated_requests(self, checkpoint: int) -> list[int]:
        """Indices (in edit order) of the edited requests whose editing metrics are scored after
        ``checkpoint`` edits: all of them, or ``evaluation.edit_sample`` of them.

        The sample comes from one seeded order of all ``n_edits`` requests, drawn once per trajectory:
        at each checkpoint it is the first ``edit_sample`` of that order among the requests edited
        so far. A request scored at a later checkpoint was scored at every earlier one it had been
        edited by, so the curve follows the same requests wherever the sample can hold them (a fresh
        sample per checkpoint would compare different requests from point to point)."""
        sample = self.evaluation.edit_sample
        if sample is None or sample >= checkpoint:
            return list(range(checkpoint))
        order = seeded_order(self.n_edits, f"{self.seed}:edit-sample")
        return sorted([i for i in order if i < checkpoint][:sample])


@dataclass(frozen=True)
class ResolvedHParams:
    """The typed hyper-parameters of one variant on one model, with the variant they come from."""

    model: str
    variant: MethodVariant
    hparams: Any


@dataclass(frozen=True)
class ExperimentSpec:
    experiment: str
    models: tuple[str, ...]
    methods: tuple[MethodVariant, ...]
    datasets: tuple[str, ...]
    seeds: tuple[int, ...]
    n_edits: int
    batch_size: int
    checkpoints: tuple[int, ...]
    selection: str
    evaluation: EvaluationSpec
    resources: Resources
    store: str
    max_restarts: int
    dtype: str = "float32"
    source: str = "<dict>"
    data_root: str | None = None  # None: settings.data_dir() when the digests are taken
    # Every (model, variant)'s typed hyper-parameters, resolved once when the spec is validated (or a
    # variant added by ``with_methods``); trajectories take theirs from here.
    resolved: tuple[ResolvedHParams, ...] = ()
    # Also save the edit log every this many edit steps, between checkpoints (None: at checkpoints only),
    # so that an interrupted trajectory loses at most these steps. How a run is kept, not what it
    # computes: a resumed trajectory makes exactly the edits an uninterrupted one makes, so it is not in
    # the trajectories' ids.
    save_every: int | None = None

    def hparams_of(self, model: str, variant: MethodVariant):
        """The typed hyper-parameters ``variant`` runs with on ``model``, as resolved with the spec."""
        for entry in self.resolved:
            if entry.model == model and entry.variant == variant:
                return entry.hparams
        raise ValueError(f"{variant.name} on {model}: its hyper-parameters were not resolved with the spec "
                         "(a variant added after loading goes through ExperimentSpec.with_methods)")

    def with_methods(self, methods: Sequence[MethodVariant]) -> "ExperimentSpec":
        """This spec running ``methods`` instead; a variant it did not hold is resolved here, once."""
        resolved = list(self.resolved)
        for model in self.models:
            for variant in methods:
                if not any(e.model == model and e.variant == variant for e in resolved):
                    resolved.append(ResolvedHParams(model, variant, resolve_hparams(model, variant)))
        return dataclasses.replace(self, methods=tuple(methods), resolved=tuple(resolved))

    @functools.cached_property
    def input_digests(self) -> dict[str, str]:
        """Each data set's file digest and each model's fingerprint, taken once per spec."""
        root = settings.data_dir(self.data_root)
        digests = {dataset: file_digest(root / edit_dataset_file(dataset)) for dataset in self.datasets}
        return {**digests, **{model: model_fingerprint(model) for model in self.models}}

    def trajectories(self) -> list["TrajectorySpec"]:
        digests = self.input_digests
        return [TrajectorySpec(self.experiment, model, variant, self.hparams_of(model, variant), dataset, seed,
                               self.n_edits, self.batch_size,
                               self.checkpoints, self.selection, self.evaluation, self.resources, self.dtype,
                               digests[dataset], digests[model])
                for model in self.models for dataset in self.datasets for variant in self.methods
                for seed in self.seeds]


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (read in 1 MiB blocks); "" when there is no such file."""
    if not path.is_file():
        return ""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def model_fingerprint(model: str) -> str:
    """A model by content: a digest of its checkpoint files' digests (weights, config, tokenizer). A
    tiny model is built from its name alone; a hub id, or a model this machine lacks, is its name."""
    from workers.models import TINY_MODELS, resolve_checkpoint

    if model in TINY_MODELS:
        return f"tiny:{model}"
    try:
        path = Path(resolve_checkpoint(model))
    except (FileNotFoundError, ValueError):  # not on this machine: the spec is checked without models
        return f"absent:{model}"
    if not path.is_dir():
        return f"hub:{model}"
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    combined = "".join(f"{p.name}:{file_digest(p)};" for p in files)
    return hashlib.sha256(combined.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Loading and validation

TOP_LEVEL = {"experiment", "models", "methods", "datasets", "seeds", "n_edits", "batch_size", "checkpoints",
             "selection", "evaluation", "resources", "hparams", "store", "max_restarts", "dtype", "save_every"}


def load_spec(path: str | Path, *, check_models: bool = True, check_data: bool = True,
              data_root: str | Path | None = None) -> ExperimentSpec:
    """Read and validate an experiment YAML. ``check_models``/``check_data`` look for the models and
    data files on this machine (off for specs meant for another machine, e.g. in tests)."""
    path = Path(path)
    return spec_from_dict(read_spec_yaml(path), source=path, base_dir=path.parent, check_models=check_models,
                          check_data=check_data, data_root=data_root)


def read_spec_yaml(path: Path) -> Any:
    """The parsed YAML of a spec (or hyper-parameter) file, or a SpecError naming the file."""
    if not path.is_file():
        raise SpecError(path, "<file>", "no such file")
    if path.stat().st_size > MAX_SPEC_BYTES:
        raise SpecError(path, "<file>", f"{path.stat().st_size} bytes; a spec holds at most {MAX_SPEC_BYTES}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(path, "<file>", f"not UTF-8 text (byte {exc.start})") from exc
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and expanded_size(node) > MAX_SPEC_NODES:
            raise SpecError(path, "<yaml>", f"more than {MAX_SPEC_NODES} values once its aliases are expanded")
        return yaml_files.load_text(text)
    except yaml.YAMLError as exc:
        raise SpecError(path, "<yaml>", " ".join(str(exc).split())) from exc


def expanded_size(root: yaml.Node) -> int:
    """How many nodes the YAML graph holds with every alias expanded, counted on the graph (an alias
    is the same node object), so the count costs one visit per distinct node however large it is."""
    sizes: dict[int, int] = {}
    order, stack = [], [root]
    while stack:  # depth-first, children after parents; each distinct node once
        node = stack.pop()
        if id(node) in sizes:
            continue
        sizes[id(node)] = 0
        order.append(node)
        stack.extend(children(node))
    for node in reversed(order):  # children before parents; a cycle (recursive alias) counts as a leaf
        sizes[id(node)] = min(1 + sum(sizes[id(child)] for child in children(node)), MAX_SPEC_NODES + 1)
    return sizes[id(root)]


def children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def spec_from_dict(raw: Any, *, source: str | Path = "<dict>", base_dir: str | Path | None = None,
                   check_models: bool = True, check_data: bool = True,
                   data_root: str | Path | None = None) -> ExperimentSpec:
    """Validate a spec given as data (what the YAML holds). ``base_dir`` resolves relative paths."""
    v = SpecValidator(source, Path(base_dir) if base_dir is not None else Path.cwd())
    if not isinstance(raw, dict):
        raise SpecError(source, "<top level>", "expected a mapping of fields")
    v.no_unknown(raw, TOP_LEVEL, "")

    experiment = v.name(v.required(raw, "experiment"), "experiment")
    models = v.str_list(v.required(raw, "models"), "models")
    datasets = tuple(v.dataset(d, f"datasets[{i}]") for i, d in enumerate(v.str_list(v.required(raw, "datasets"),
                                                                                      "datasets")))
    seeds = tuple(v.integer(s, f"seeds[{i}]", minimum=0) for i, s in enumerate(v.as_list(raw.get("seeds", [0]),
                                                                                           "seeds")))
    if len(set(seeds)) != len(seeds):
        raise SpecError(source, "seeds", f"repeated seeds in {list(seeds)}")
    n_edits = v.integer(v.required(raw, "n_edits"), "n_edits", minimum=1)
    batch_size = v.integer(raw.get("batch_size", 1), "batch_size", minimum=1)
    if batch_size > n_edits:
        raise SpecError(source, "batch_size", f"{batch_size} is larger than n_edits ({n_edits})")
    checkpoints = v.checkpoints(raw.get("checkpoints", [0, n_edits]), n_edits, batch_size)
    selection = raw.get("selection", "random")
    if selection not in SELECTIONS:
        raise SpecError(source, "selection", f"{selection!r} is not one of {list(SELECTIONS)}")
    method_hparams = v.method_hparams(raw.get("hparams", {}))
    methods = v.methods(v.required(raw, "methods"), method_hparams)
    unused = sorted(set(method_hparams) - {variant.method for variant in methods})
    if unused:  # an override that changes nothing is a typo or a forgotten method
        raise SpecError(source, f"hparams.{unused[0]}", "no variant in `methods` runs this method")
    evaluation = v.evaluation(raw.get("evaluation", {}))
    resources = v.resources(raw.get("resources", {}))
    store = raw.get("store", "results")
    if not isinstance(store, str) or not store.strip():
        raise SpecError(source, "store", "expected a directory path")
    max_restarts = v.integer(raw.get("max_restarts", 1), "max_restarts", minimum=0)
    save_every = raw.get("save_every")
    if save_every is not None:
        save_every = v.integer(save_every, "save_every", minimum=1)
    dtype = raw.get("dtype", "float32")
    if dtype not in DTYPES:
        raise SpecError(source, "dtype", f"{dtype!r} is not one of {list(DTYPES)}")

    if check_models:
        for i, model in enumerate(models):
            v.model_available(model, f"models[{i}]")
    resolved = []
    for i, model in enumerate(models):
        for j, variant in enumerate(methods):
            hparams = v.hparams_resolve(model, variant, f"models[{i}]", f"methods[{j}]")
            v.perplexity_text(model, variant, hparams, evaluation, data_root)
            resolved.append(ResolvedHParams(model, variant, hparams))
    if check_data:
        root = settings.data_dir(data_root)
        for i, dataset in enumerate(datasets):
            v.file_present(root, edit_dataset_file(dataset), f"datasets[{i}]")
        for task in evaluation.tasks:
            relpath = TASKS[task].data_set(evaluation.config).file
            v.file_present(root, relpath, f"evaluation.tasks.{task}")
    return ExperimentSpec(experiment, tuple(models), methods, datasets, seeds, n_edits, batch_size, checkpoints,
                          selection, evaluation, resources, store, max_restarts, dtype, source=str(source),
                          data_root=None if data_root is None else str(data_root), resolved=tuple(resolved),
                          save_every=save_every)


def resolve_hparams(model: str, variant: MethodVariant):
    """The typed hyper-parameters a trajectory runs with: the shipped defaults for (method, model) or
    the variant's ``hparams_file``, with its overrides applied."""
    return load_hparams(variant.method, model, overrides=variant.hparams or None, path=variant.hparams_file)


class SpecValidator:
    """Checks a spec's fields: each method returns the checked value or raises ``SpecError`` naming the
    file and field. The tune spec's ``SearchValidator`` (``orchestrator/tune_spec.py``) extends it."""

    def __init__(self, source, base_dir: Path):
        self.source, self.base_dir = source, base_dir
        # variant name -> {override key -> the spec field it was written in}, so that a bad
        # hyper-parameter value is reported where the user wrote it (``methods[1].hparams.lr``).
        self.override_fields: dict[str, dict[str, str]] = {}

    def fail(self, field_name: str, problem: str):
        raise SpecError(self.source, field_name, problem)

    def required(self, raw: dict, key: str, prefix: str = ""):
        if key not in raw or raw[key] is None:
            self.fail(prefix + key, "missing")
        return raw[key]

    def no_unknown(self, raw: dict, known: set, prefix: str) -> None:
        unknown = sorted(set(raw) - known, key=str)
        if unknown:
            self.fail(prefix + str(unknown[0]), f"unknown field; known: {sorted(known)}")

    def name(self, value, field_name: str) -> str:
        if not isinstance(value, str) or not _NAME.match(value):
            self.fail(field_name, f"{value!r} is not a name (letters, digits, '_', '.', '-')")
        if len(value) > MAX_NAME:
            self.fail(field_name, f"{len(value)} characters; a name has at most {MAX_NAME}")
        return value

    def as_list(self, value, field_name: str) -> list:
        if isinstance(value, str) or is_number(value):
            return [value]
        if not isinstance(value, list) or not value:
            self.fail(field_name, "expected a non-empty list")
        return value

    def str_list(self, value, field_name: str) -> list[str]:
        items = self.as_list(value, field_name)
        for i, item in enumerate(items):
            if not isinstance(item, str) or not item.strip():
                self.fail(f"{field_name}[{i}]", f"expected a non-empty string, got {item!r}")
        if len(set(items)) != len(items):
            self.fail(field_name, f"repeated entries in {items}")
        return items

    def integer(self, value, field_name: str, *, minimum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field_name, f"expected an integer, got {value!r}")
        if minimum is not None and value < minimum:
            self.fail(field_name, f"must be at least {minimum}, got {value}")
        return value

    def number(self, value, field_name: str, *, minimum: float = 0.0) -> float:
        if not is_finite_number(value):
            self.fail(field_name, f"expected a finite number, got {value!r}")
        if value < minimum:
            self.fail(field_name, f"must be at least {minimum}, got {value}")
        return float(value)

    def mapping(self, value, field_name: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(field_name, f"expected a mapping, got {type(value).__name__}")
        return value

    def checkpoints(self, value, n_edits: int, batch_size: int) -> tuple[int, ...]:
        if isinstance(value, dict):
            self.no_unknown(value, {"every"}, "checkpoints.")
            every = self.integer(self.required(value, "every", "checkpoints."), "checkpoints.every", minimum=1)
            if n_edits // every + 1 > MAX_CHECKPOINTS:  # counted before the list is built
                self.fail("checkpoints.every", f"{n_edits // every + 1} checkpoints; at most {MAX_CHECKPOINTS}")
            points = list(range(0, n_edits + 1, every))
        else:
            points = [self.integer(c, f"checkpoints[{i}]", minimum=0)
                      for i, c in enumerate(self.as_list(value, "checkpoints"))]
        for i, point in enumerate(points):
            if point > n_edits:
                self.fail(f"checkpoints[{i}]", f"{point} is beyond n_edits ({n_edits})")
            if point % batch_size and point != n_edits:
                self.fail(f"checkpoints[{i}]", f"{point} is not a multiple of batch_size ({batch_size})")
        # The final model is always evaluated.
        return tuple(sorted(set(points) | {n_edits}))

    def dataset(self, value: str, field_name: str) -> str:
        if value in EDIT_DATASETS:
            return value
        path = Path(value)
        if not path.is_absolute():
            path = self.base_dir / path
        if path.suffix in (".json", ".jsonl"):
            return str(path.resolve())
        self.fail(field_name, f"{value!r} is neither a known data set {sorted(EDIT_DATASETS)} nor a .json file")

    def existing_file(self, value, field_name: str) -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(field_name, f"expected a file path, got {value!r}")
        path = Path(value).expanduser()
        path = path if path.is_absolute() else self.base_dir / path
        if not path.is_file():
            self.fail(field_name, f"hyper-parameter file {path} does not exist")
        return str(path.resolve())

    def hparams_value(self, value, field_name: str) -> dict:
        """Overrides given inline, or as a path to a YAML file of overrides (relative to the spec)."""
        if isinstance(value, str):
            path = Path(self.existing_file(value, field_name))
            value = read_spec_yaml(path) or {}  # the same caps as the spec; errors name that file
        value = self.mapping(value, field_name)
        for key in value:
            if not isinstance(key, str):
                self.fail(field_name, f"hyper-parameter names are strings, got {key!r}")
        return dict(value)

    def method_name(self, value, field_name: str) -> str:
        if value not in METHODS:
            self.fail(field_name, f"unknown method {value!r}; known: {list(METHODS)}")
        return value

    def method_hparams(self, raw) -> dict[str, dict]:
        raw = self.mapping(raw, "hparams")
        out = {}
        for method, overrides in raw.items():
            self.method_name(method, f"hparams.{method}")
            out[method] = self.hparams_value(overrides, f"hparams.{method}")
        return out

    def methods(self, raw, method_hparams: dict[str, dict]) -> tuple[MethodVariant, ...]:
        variants = []
        for i, entry in enumerate(self.as_list(raw, "methods")):
            where = f"methods[{i}]"
            if isinstance(entry, str):
                entry = {"method": entry}
            entry = self.mapping(entry, where)
            self.no_unknown(entry, {"name", "method", "hparams", "hparams_file", "group"}, where + ".")
            method = self.method_name(self.required(entry, "method", where + "."), where + ".method")
            name = self.name(entry.get("name", method), where + ".name")
            group = entry.get("group")
            if group is not None and group not in GROUPS:
                self.fail(where + ".group", f"{group!r} is not one of {list(GROUPS)}")
            own = self.hparams_value(entry.get("hparams", {}), where + ".hparams")
            hparams = {**method_hparams.get(method, {}), **own}
            self.override_fields[name] = {**{key: f"hparams.{method}.{key}" for key in method_hparams.get(method, {})},
                                          **{key: f"{where}.hparams.{key}" for key in own}}
            hparams_file = entry.get("hparams_file")
            if hparams_file is not None:
                hparams_file = self.existing_file(hparams_file, where + ".hparams_file")
            variants.append(MethodVariant(name, method, hparams, group, hparams_file))
        names = [v.name for v in variants]
        for i, name in enumerate(names):
            if names.index(name) != i:
                self.fail(f"methods[{i}].name", f"{name!r} is used twice; give each variant its own name")
        return tuple(variants)

    def evaluation(self, raw) -> EvaluationSpec:
        raw = dict(self.mapping(raw, "evaluation"))
        tasks = {}
        for task, count in self.mapping(raw.pop("tasks", {}), "evaluation.tasks").items():
            if task not in TASKS:
                self.fail(f"evaluation.tasks.{task}", f"unknown task; known: {sorted(TASKS)}")
            tasks[task] = self.integer(count, f"evaluation.tasks.{task}", minimum=1)
        edit_sample = raw.pop("edit_sample", None)
        if edit_sample is not None:
            edit_sample = self.integer(edit_sample, "evaluation.edit_sample", minimum=1)
        try:
            config = EvalConfig.from_dict({"tasks": tasks, **raw}, source="evaluation")
        except FieldError as exc:
            self.fail(f"evaluation.{exc.path}", exc.problem)
        except (TypeError, ValueError) as exc:
            self.fail("evaluation", str(exc).removeprefix("evaluation: "))
        return EvaluationSpec(config, edit_sample, raw)

    def actor_resources(self, raw, where: str, extra: set) -> tuple[ActorResources, dict]:
        raw = self.mapping(raw, where)
        self.no_unknown(raw, {"num_cpus", "num_gpus"} | extra, where + ".")
        resources = ActorResources(self.number(raw.get("num_cpus", 1), where + ".num_cpus"),
                                   self.number(raw.get("num_gpus", 0), where + ".num_gpus"))
        if resources.num_cpus == 0 and resources.num_gpus == 0:
            self.fail(where, "an actor needs at least some CPU or GPU")
        return resources, raw

    def resources(self, raw) -> Resources:
        raw = self.mapping(raw, "resources")
        self.no_unknown(raw, {"trajectory", "evaluation", "max_parallel_trajectories"}, "resources.")
        trajectory, _ = self.actor_resources(raw.get("trajectory", {}), "resources.trajectory", set())
        evaluation, eval_raw = self.actor_resources(raw.get("evaluation", {}), "resources.evaluation",
                                                    {"actors", "engine", "ranks"})
        actors = self.integer(eval_raw.get("actors", 1), "resources.evaluation.actors", minimum=1)
        parallel = raw.get("max_parallel_trajectories")
        if parallel is not None:
            parallel = self.integer(parallel, "resources.max_parallel_trajectories", minimum=1)
        engine, ranks = self.eval_engine(eval_raw, evaluation)
        return Resources(trajectory, evaluation, actors, parallel, eval_engine=engine, eval_ranks=ranks)

    def eval_engine(self, raw: dict, evaluation: ActorResources) -> tuple[str, int]:
        """``engine`` and ``ranks`` of ``resources.evaluation``: a sharded engine's ranks share the
        replica's GPUs one each, or run on CPU (num_gpus: 0) with ``ranks`` (gloo)."""
        where = "resources.evaluation."
        engine = raw.get("engine", "transformers")
        if engine not in ENGINES:
            self.fail(where + "engine", f"{engine!r} is not one of {list(ENGINES)}")
        gpus = evaluation.num_gpus
        if engine == "transformers":
            if "ranks" in raw:
                self.fail(where + "ranks", "ranks are for a sharded engine (engine: deepspeed or tp)")
            return engine, 1
        if gpus and (gpus != int(gpus) or gpus < 2):
            self.fail(where + "num_gpus", f"engine {engine!r} gives each rank one whole GPU: num_gpus must be a "
                                          f"whole number of at least 2, got {gpus:g}")
        if not gpus and "ranks" not in raw:
            self.fail(where + "ranks", f"engine {engine!r} on CPU (num_gpus: 0) needs the number of ranks")
        ranks = self.integer(raw.get("ranks", int(gpus)), where + "ranks", minimum=2)
        if gpus and ranks != gpus:
            self.fail(where + "ranks", f"{ranks} ranks for {gpus:g} GPUs: each rank holds one GPU")
        return engine, ranks

    def hparams_resolve(self, model: str, variant: MethodVariant, model_field: str, variant_field: str):
        """The typed hyper-parameters ``variant`` runs with on ``model``: the published defaults (or its
        ``hparams_file``) must exist, the overrides name real fields with fitting values, and the
        layers edited must be the model's. Resolved here, once; the spec keeps them."""
        try:
            defaults = load_hparams(variant.method, model, path=variant.hparams_file)
        except ValueError as exc:
            self.fail(variant_field + ".hparams_file" if variant.hparams_file else model_field,
                      f"{variant.method} on {model}: {exc}")
        try:
            hparams = with_overrides(defaults, variant.hparams or None)
        except FieldError as exc:  # a value of the wrong type or out of range, or an unknown name
            written = self.override_fields.get(variant.name, {})
            self.fail(written.get(exc.path, variant_field + ".hparams"), f"{variant.method} on {model}: {exc.problem}")
        except (TypeError, ValueError) as exc:
            self.fail(variant_field + ".hparams", f"{variant.method} on {model}: {exc}")
        self.layers_exist(model, variant, hparams, model_field, variant_field)
        return hparams

    def layers_exist(self, model: str, variant: MethodVariant, hparams, model_field: str, variant_field: str) -> None:
        """The layers the method edits are layers of the model (its config file, read without weights)."""
        from workers.models import layer_count

        try:
            count = layer_count(model)
        except ValueError as exc:
            self.fail(model_field, str(exc))
        if count is None:  # no config on this machine (a hub id, a model not pulled yet): checked at load
            return
        beyond = [layer for layer in BASES[split_method(variant.method)[0]].layers(hparams) if layer >= count]
        if beyond:
            written = self.override_fields.get(variant.name, {})
            key = next((key for key in ("layer", "layers") if key in written), None)
            where = written[key] if key else variant_field + ".hparams_file" if variant.hparams_file else model_field
            self.fail(where, f"{variant.method} edits layer(s) {beyond}, but {model} has {count} "
                             f"(layers 0-{count - 1})")

    def perplexity_text(self, model: str, variant: MethodVariant, hparams, evaluation: EvaluationSpec,
                        data_root) -> None:
        """Perplexity is not scored on the text the variant's second moments come from (unless allowed)."""
        stats_corpus = getattr(hparams, "stats_corpus", None)
        try:
            check_statistics_text(evaluation.config, stats_corpus, data_root)
        except ValueError as exc:
            self.fail("evaluation.perplexity_corpus", f"{variant.name} on {model}: {exc}")

    def model_available(self, model: str, field_name: str) -> None:
        from workers.models import TINY_MODELS, WHEEL_MODELS

        if model in TINY_MODELS or model in WHEEL_MODELS:
            return
        path = Path(model).expanduser()
        if path.suffix == ".gguf" or model.startswith((".", "/", "~")):
            if not path.exists():
                self.fail(field_name, f"model file or directory {path} does not exist")
            return
        if path.is_dir():
            return
        if settings.offline():
            self.fail(field_name, f"{model!r} is not a local model, a known name "
                                  f"({sorted(WHEEL_MODELS) + list(TINY_MODELS)}) and EAC_OFFLINE forbids the hub")

    def file_present(self, root: Path, relpath: str, field_name: str) -> None:
        path = Path(relpath)
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            self.fail(field_name, f"data file {path} does not exist (data directory {root}; "
                                  "set EAC_DATA_DIR or --data-dir)")

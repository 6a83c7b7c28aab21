"""The registry of editing methods: every base method and every constraint, in one place.

A method name is a base method (``rome``, ``memit``, ``alphaedit``, ``ft-l``, ``ft-m``) or
``<base>-<constraint>`` (``rome-eac``, ``memit-rect``, ...). The Editor, the hyper-parameter loader,
the spec validator and the figures all read this table; adding a method is its module plus one
``BASES`` entry, adding a constraint its module, its settings section on the base methods'
hyper-parameters (``hparams.section``) and one ``CONSTRAINTS`` entry.

Hyper-parameter files: ``workers/hparams/<base>/<model>.yaml`` for a base method and
``workers/hparams/<constraint>/<base>/<model>.yaml`` for the section a constraint adds.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from workers.editing.alphaedit import apply_alphaedit, remember_keys
from workers.editing.context import EditContext
from workers.editing.delta import EditLog, WeightDelta, WeightSnapshot, applied
from workers.editing.eac import AnchoredOptimiser
from workers.editing.encore import MostProbableOptimiser, NormConstrainedSolve
from workers.editing.ft import apply_ft
from workers.editing.hparams import (HPARAMS_DIR, HPARAMS_KEYS, AlphaEditHParams, FTHParams, MemitHParams,
                                     RomeHParams, base_changes, from_dict, hparams_key, read_yaml, sections,
                                     with_overrides)
from workers.editing.memit import LayerSolve, apply_memit, remember_solved
from workers.editing.nas import NormAnchoredOptimiser
from workers.editing.prune import restrain_at_checkpoint, restrain_each_step
from workers.editing.record import StepInfo
from workers.editing.rect import RectSparsifier
from workers.editing.rome import apply_rome
from workers.editing.targets import TargetOptimiser

# (model, tokenizer, requests, hparams, ctx, method name) -> the step's delta, already applied, and its report
EditStep = Callable[..., tuple[WeightDelta, StepInfo]]
# (model, the step's applied delta, the weights before the step) -> the delta that replaces it, applied
WeightRewrite = Callable[[Any, WeightDelta, WeightSnapshot], WeightDelta]
# (model holding base + an edit log, the base weights of the matrices the log touched) -> None: rewrites
# those matrices in place into the weights a checkpoint is scored with
CheckpointRewrite = Callable[[Any, WeightSnapshot], None]


@dataclass(frozen=True)
class Method:
    """A base editing method."""

    hparams: type                                    # its hyper-parameter class
    layers: Callable[[Any], list[int]]               # hparams -> the layers whose MLP output it rewrites
    apply: EditStep                                  # one edit step
    second_moments: Callable[[Any], bool]            # hparams -> whether it reads C_l of the unedited model
    context_templates: bool = True                   # whether it averages keys over generated templates
    # After a saved log is replayed (Editor.resume): rebuild the running state one step left in the
    # edit context (AlphaEdit: Σ K Kᵀ of the earlier edits' keys). None: the method keeps none.
    on_resume: Callable[[EditContext, WeightDelta], None] | None = None


@dataclass(frozen=True)
class Constraint:
    """What ``<base>-<name>`` adds to a base method; its settings are the base hyper-parameters'
    ``<name>`` section. It wraps the base through hooks, each built by the Editor from those
    settings; the base method never knows which constraint, if any, is around it."""

    bases: tuple[str, ...]  # the base methods it combines with
    # (its settings) -> the target optimiser the base runs instead of the plain one (the Editor puts it
    # in the edit context, ``ctx.optimiser``): EAC's two phases around the shared loop, NAS's rescaling
    # of the solved target, ENCORE's most-probable early stop. None: the plain one.
    optimise: Callable[[Any], TargetOptimiser] | None = None
    # (its settings, the base weights) -> a rewrite of each step's update after the base method wrote
    # it (PRUNE per step, RECT), or None for settings that leave the steps alone. None: the weights are
    # the base method's.
    rewrite: Callable[[Any, WeightSnapshot], WeightRewrite | None] | None = None
    # (its settings) -> what a checkpoint is scored with instead of base + the log as replayed (PRUNE as
    # its paper applies it: the accumulated update restrained at evaluation), or None for settings that
    # score the replayed weights. Built by ``scored_weights`` from the settings the log records, so the
    # evaluators never name a constraint. None: every checkpoint is scored as replayed.
    checkpoint: Callable[[Any], CheckpointRewrite | None] | None = None
    # (its settings) -> MEMIT's per-layer least-squares solve instead of its own (the Editor puts it in
    # the edit context, ``ctx.layer_solve``): ENCORE's Frobenius-norm term. None: MEMIT's own.
    solve: Callable[[Any], LayerSolve] | None = None
    sets_base_fields: bool = False  # its YAML's ``base:`` mapping may set base-method fields


def one_layer(hparams) -> list[int]:
    return [hparams.layer]


def spread_layers(hparams) -> list[int]:
    return list(hparams.layers)


def always(hparams) -> bool:
    return True


def never(hparams) -> bool:
    return False


def rome_second_moments(hparams: RomeHParams) -> bool:
    return hparams.mom2_adjustment  # C⁻¹ k* (Eq. 7); without it the update needs no statistics


BASES: dict[str, Method] = {
    "rome": Method(RomeHParams, one_layer, apply_rome, rome_second_moments),
    "memit": Method(MemitHParams, spread_layers, apply_memit, always, on_resume=remember_solved),
    "alphaedit": Method(AlphaEditHParams, spread_layers, apply_alphaedit, always, on_resume=remember_keys),
    "ft-l": Method(FTHParams, one_layer, apply_ft, never, context_templates=False),
    "ft-m": Method(FTHParams, one_layer, apply_ft, never, context_templates=False),
}
LOCATE_THEN_EDIT = ("rome", "memit", "alphaedit")
CONSTRAINTS: dict[str, Constraint] = {
    "eac": Constraint(tuple(BASES), optimise=AnchoredOptimiser, sets_base_fields=True),
    "prune": Constraint(LOCATE_THEN_EDIT, rewrite=restrain_each_step, checkpoint=restrain_at_checkpoint),
    "rect": Constraint(LOCATE_THEN_EDIT, rewrite=RectSparsifier),
    "nas": Constraint(LOCATE_THEN_EDIT, optimise=NormAnchoredOptimiser),
    "encore": Constraint(("memit",), optimise=MostProbableOptimiser, solve=NormConstrainedSolve),
}
METHODS = tuple(BASES) + tuple(f"{base}-{name}" for name, constraint in CONSTRAINTS.items()
                               for base in constraint.bases)

def check_sections() -> None:
    """Refuse, at import, a constraint whose section a base it combines with lacks."""
    for name, constraint in CONSTRAINTS.items():
        for base in constraint.bases:
            if name not in sections(BASES[base].hparams):
                raise TypeError(f"constraint {name!r} combines with {base!r}, but {BASES[base].hparams.__name__} "
                                f"has no '{name}' field (hparams.section)")


check_sections()


def split_method(method: str) -> tuple[str, str | None]:
    """``"memit-rect"`` -> ``("memit", "rect")``; a base method -> ``(method, None)``."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {list(METHODS)}")
    for constraint in CONSTRAINTS:
        if method.endswith("-" + constraint):
            return method[: -len(constraint) - 1], constraint
    return method, None


def load_hparams(method: str, model=None, *, overrides: dict | None = None, path: str | Path | None = None):
    """Hyper-parameters of ``method`` for ``model`` (a loaded model or a model name/key), or from
    the YAML file ``path``."""
    base, constraint = split_method(method)
    cls = BASES[base].hparams
    if path is not None:
        source = Path(path)
        values = read_yaml(source)
    else:
        key = model if isinstance(model, str) and model in set(HPARAMS_KEYS.values()) else hparams_key(model)
        source = HPARAMS_DIR / base / f"{key}.yaml"
        if not source.exists():
            raise ValueError(f"no {base} hyper-parameters for {key!r} ({source} is missing)")
        values = read_yaml(source)
        if constraint is not None:
            section_file = HPARAMS_DIR / constraint / base / f"{key}.yaml"
            if not section_file.exists():
                raise ValueError(f"no {constraint} hyper-parameters for {base} on {key!r} ({section_file} is missing)")
            section_values = read_yaml(section_file)
            if CONSTRAINTS[constraint].sets_base_fields:  # base-method fields for this variant only
                values.update(base_changes(section_values.pop("base", None) or {}, cls, section_file))
            values[constraint] = section_values
    if constraint is not None and values.get(constraint) is None:
        raise ValueError(f"{source}: method {method} needs the '{constraint}' section")
    for other in CONSTRAINTS:  # a method runs with its own constraint's section only
        if other != constraint:
            values.pop(other, None)
    return with_overrides(from_dict(cls, values, str(source)), overrides)


def checkpoint_rewrite(log: EditLog) -> CheckpointRewrite | None:
    """What the constraint of the method that made ``log`` does to the weights a checkpoint is scored
    with (its ``checkpoint`` hook), built from the settings the log records (``Editor``: the method and
    its hyper-parameters, in the log's metadata); None: base + the log as replayed. A log that records
    no method (one made by hand, or an older release's without one) is scored as replayed."""
    method = log.metadata.get("method")
    if method is None:
        return None
    base, name = split_method(str(method))
    constraint = CONSTRAINTS.get(name)
    if constraint is None or constraint.checkpoint is None:
        return None
    hparams = log.metadata.get("hparams")
    recorded = hparams.get(name) if isinstance(hparams, dict) else None
    if not isinstance(recorded, dict):
        raise ValueError(f"an edit log of {method} records no '{name}' settings (metadata 'hparams.{name}')")
    settings = from_dict(sections(BASES[base].hparams)[name], recorded, f"the edit log's {name} settings")
    return constraint.checkpoint(settings)


def scored_weights(model, log: EditLog) -> applied:
    """``with scored_weights(model, log):`` — inside the block ``model`` (holding the base weights) holds
    what a checkpoint of ``log`` is scored with: base + the log replayed, then rewritten by the
    ``checkpoint`` hook of the log's constraint, if any; afterwards exactly its previous weights."""
    return applied(model, log, checkpoint_rewrite(log))

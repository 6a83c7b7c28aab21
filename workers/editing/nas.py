"""Norm-Anchor Scaling (NAS; Liu, Zhu, Miao, Fujisawa, "Norm Anchors Make Model Edits Last", arXiv
2602.02543) around ROME, MEMIT and AlphaEdit.

The paper's diagnosis: in sequential locate-then-edit editing the solved value vectors and the edited
MLP weights amplify each other (a larger W gives larger activations, whose solved v* is larger, whose
update makes W larger still), roughly exponentially. NAS breaks the loop with one rescaling of each
solved value vector to a norm taken from the *original* model:

    v* ← r · v* / ‖v*‖,     r = mean over reference rewrites of ‖v*‖ solved on the unedited model

and the base method's update then writes the rescaled v*. Direction is kept; only the norm is anchored.

Which vector is v*: the MLP output at the edited position, v* = v0 + δ, with v0 the MLP output of the
bare prompt at the subject's last token (as the authors' code takes it). For ROME that is the whole
target (v_init = v0). For MEMIT and AlphaEdit the target z lives in the residual stream after the last
edited layer: z = (z_init − v0) + v*, i.e. the pre-MLP residual plus the value vector, and only v* is
rescaled (the authors' ``compute_z``: ``target = res_pre_mlp + v_star``). In both cases the rewrite is
δ ← rescale(v0 + δ) − v0, applied by NAS's target optimiser (``NormAnchoredOptimiser``, the
registry's optimiser hook) to the plain optimiser's result, before the base's update, so the edit
log holds the update actually written and replays exactly.

The reference r (computed once per editor, on the unedited model, before any edit; cached on disk by
the base model's fingerprint and the settings; measured in the optimiser's ``prepare``): ``reference_edits`` rewrites sampled (seeded) from
``reference_dataset``, each solved on its bare prompt by the method's own target optimiser at the
method's own layer, and the mean of their ‖v0 + δ‖ after dropping the largest ``trim_upper`` share.

Where this departs from the authors' code (each reachable by configuration, hparams.NASHParams):
- their reference solves the rewrites with MEMIT's settings whatever the editor; here with the
  method's own settings (ROME's clamp, weight decay and layer for ROME-NAS), so that the anchor is the
  norm of the kind of vector it rescales. ``reference_prompts: templates`` also solves them on the
  method's rewriting prompts (context templates) rather than the bare prompt (their choice, default).
- their code drops a v* longer than twice the reference instead of rescaling it (δ = 0: the edit
  writes nothing); the paper describes rescaling every vector. ``skip_above: 2`` gives theirs.
- their reference pool is all of CounterFact, edited facts included; here a seeded sample of
  ``reference_dataset`` (default the validation split) of ``reference_edits`` rewrites (1000 in their
  code; the CPU default model's YAML uses fewer, stated there).
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from workers.editing.hparams import NASHParams, RomeHParams
from workers.editing.targets import OptimisationResult, TargetBatch, TargetOptimiser, TargetProblem, optimise_deltas


def rescaled_delta(v0: torch.Tensor, delta: torch.Tensor, reference: float,
                   skip_above: float | None = None) -> torch.Tensor:
    """δ' such that v0 + δ' = reference · (v0 + δ) / ‖v0 + δ‖ (computed in float64, returned in δ's
    dtype); with ``skip_above``, δ' = 0 when ‖v0 + δ‖ > skip_above · reference (the authors' code)."""
    v_star = v0.double() + delta.double()
    norm = float(v_star.norm())
    if not math.isfinite(norm) or norm == 0.0:
        return delta.clone()
    if skip_above is not None and norm > skip_above * reference:
        return torch.zeros_like(delta)
    return (v_star * (reference / norm) - v0.double()).to(delta.dtype)


def trimmed_mean(values: list[float], trim_upper: float) -> float:
    """Mean after dropping the floor(trim_upper · n) largest values (the authors' ``_upper_trimmed_mean``)."""
    ordered = sorted(values)
    drop = int(math.floor(trim_upper * len(ordered)))
    kept = ordered[: len(ordered) - drop] if drop else ordered
    return float(sum(kept) / len(kept))


def target_site(hparams) -> tuple[int, str]:
    """Where the method optimises its target: ROME at its layer's MLP output, MEMIT and AlphaEdit at the
    residual output of their last layer."""
    if isinstance(hparams, RomeHParams):
        return hparams.layer, "mlp"
    return list(hparams.layers)[-1], "residual"


class NormAnchoredOptimiser(TargetOptimiser):
    """The target optimiser of a ``<base>-nas`` method (the registry builds it from the ``nas`` section):
    the plain optimisation, then every solved δ rewritten so that v0 + δ has the reference norm. The
    reference is measured in ``prepare``, which the Editor calls on the unedited model."""

    def __init__(self, settings: NASHParams):
        self.settings = settings
        self.reference: float | None = None

    def prepare(self, hparams, ctx) -> None:
        self.reference = reference_norm(self.settings, hparams, ctx)

    def optimise(self, problem: TargetProblem) -> tuple[OptimisationResult, dict]:
        result, report = super().optimise(problem)
        self.rescale(problem, [result])
        return result, report

    def optimise_batch(self, problem: TargetBatch) -> tuple[list[OptimisationResult], list[dict]]:
        results, reports = super().optimise_batch(problem)
        self.rescale(problem, results)
        return results, reports

    def rescale(self, problem: TargetBatch, results: list[OptimisationResult]) -> None:
        """δ_r ← rescale(v0_r + δ_r) − v0_r in place, v0 = ``problem.mlp_inits`` (the MLP output, also
        where the target is the residual z: z = (z_init − v0) + v*)."""
        if self.reference is None:
            raise RuntimeError("NAS's reference norm is measured in prepare(hparams, ctx), before any edit")
        for r, result in enumerate(results):
            result.delta = rescaled_delta(problem.mlp_inits[r], result.delta, self.reference,
                                          self.settings.skip_above)


def reference_norm(settings: NASHParams, hparams, ctx) -> float:
    """r: the trimmed mean ‖v0 + δ‖ of reference rewrites solved on the model as it is now (the Editor
    prepares the optimiser before any edit, so the unedited model). Cached under ``ctx.cache_dir/nas``."""
    layer, init_from = target_site(hparams)
    templates = ctx.context_templates(hparams) if settings.reference_prompts == "templates" else ["{}"]
    config = hparams.target_config()
    key = json.dumps({"model": ctx.base_fingerprint, "layer": layer, "init_from": init_from,
                      "templates": templates, "config": repr(config), "settings": repr(settings)}, sort_keys=True)
    path = (Path(ctx.cache_dir) / "nas" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"
            if ctx.cache_dir else None)
    if path is not None and path.exists():
        return float(json.loads(path.read_text())["reference_norm"])
    norms = reference_norms(settings, ctx, layer, init_from, templates, config)
    reference = trimmed_mean(norms, settings.trim_upper)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"reference_norm": reference, "norms": norms, "key": json.loads(key)}))
        temporary.replace(path)
    return reference


def reference_norms(settings: NASHParams, ctx, layer: int, init_from: str, templates: list[str], config) -> list[float]:
    from workers.data import load_edit_dataset
    from workers.sampling import seeded_sample

    pool = load_edit_dataset(settings.reference_dataset, ctx.data_root)
    count = min(settings.reference_edits, len(pool))
    sample = [pool[i] for i in seeded_sample(len(pool), count, settings.reference_seed)]
    norms: list[float] = []
    for start in range(0, len(sample), settings.reference_batch):
        problem = TargetBatch(ctx.model, ctx.tokenizer, sample[start:start + settings.reference_batch], layer,
                              templates, init_from=init_from, config=config, compute=ctx.compute)
        for r, result in enumerate(optimise_deltas(problem)):
            norms.append(float((problem.mlp_inits[r].double() + result.delta.double()).norm()))
    return norms

"""Typed hyper-parameters per (method, model), loaded from YAML under ``workers/hparams/``
(``methods.load_hparams``; the registry of methods and constraints is ``methods.py``).

Layout: ``workers/hparams/<method>/<model>.yaml`` for the base methods (rome, memit, alphaedit,
ft-l, ft-m) and ``workers/hparams/<constraint>/<base>/<model>.yaml`` for the settings that a
``<base>-<constraint>`` method adds: ``eac`` (every base), ``prune`` and ``rect`` (rome, memit,
alphaedit). An EAC YAML's optional ``base:`` mapping sets fields of the base method for the EAC
variant only (e.g. the paper's μ as ``weight_decay``). ``<model>`` is a key such as ``gpt2-xl``, ``llama3-8b``, ``llama2-13b``,
``smollm2-135m`` or ``tiny`` (see ``hparams_key``). Overrides (for Ray Tune) use dotted names:
``{"layer": 6, "eac.gamma_percentile": 90, "rect.keep_fraction": 0.3}``.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from workers.fields import Checked, FieldError, added_later, bounded
from workers.yaml_files import read_yaml_file

# Every class here is ``Checked``: its fields' types (the annotations) and ranges (``bounded``) are
# checked whenever an instance is built — from a YAML file, from overrides, by ``dataclasses.replace``.
Score = Literal["saliency", "random", "gradient", "magnitude"]


@dataclass(frozen=True)
class TargetConfig(Checked):
    """The shared target optimiser's settings (targets.py). ``LocateEditHParams`` extends it, so a
    method's YAML sets these fields at its top level."""

    num_steps: int = bounded(20, minimum=1)
    lr: float = bounded(0.5, above=0)
    weight_decay: float = bounded(0.5, minimum=0)
    clamp_norm_factor: float = bounded(4.0, above=0)
    kl_factor: float = bounded(0.0625, minimum=0)
    early_stop_loss: float = bounded(5e-2, minimum=0)
    # True: cache the keys/values before the subject's last token once and run only the suffix at each
    # step (same losses up to float round-off, fewer tokens per step); False: every token every step.
    prefix_reuse: bool = True


def section(settings: type):
    """The field of a base method's hyper-parameters that holds a constraint's settings (``eac``,
    ``prune``, ``rect``): None unless the method is ``<base>-<constraint>``. Loading converts a YAML
    mapping under the field's name to ``settings``."""
    return field(default=None, metadata={"section": settings})


def sections(cls) -> dict[str, type]:
    """The constraint sections of a hyper-parameter class: field name -> its settings class."""
    return {f.name: f.metadata["section"] for f in dataclasses.fields(cls) if "section" in f.metadata}


@dataclass(frozen=True)
class EACHParams(Checked):
    """Editing Anchor Compression (paper §5, Appendix A, C.5). See workers/editing/eac.py.

    μ (Eq. 4) is read as the target optimiser's ``weight_decay`` (the base method's field), not as
    ``l2_weight``: the paper's μ values (C.5: 0.5 for GPT-2 XL, 1e-3 for LLaMA-3-8B) are exactly the
    ``v_weight_decay`` of the authors' ROME/MEMIT settings, and the authors' code has no other
    squared-norm term. ``l2_weight`` is an *extra* μ‖δ‖² on top, default 0 (adding the paper's μ there
    counts it twice; on the default model it blocked the edits). An EAC YAML sets the base method's
    fields it needs, such as the paper's μ as ``weight_decay``, in its ``base:`` section.

    The authors' code, as configuration: ``authors_eac_overrides(base)``.
    """

    probe_steps: int = bounded(10, minimum=1)      # phase 1: the usual optimisation, recording ∇L (paper: 10 of 20)
    retrain_steps: int = bounded(10, minimum=1)    # phase 2: anchors only, under the scored elastic net
    # γ = P_x of |score| (Eq. 2; Table 2); P100 would keep no dimension
    gamma_percentile: float = bounded(80.0, minimum=0, below=100)
    # percentile: |score| ≥ γ | top_fraction: top (100 − x)% (authors' top-k)
    anchor_rule: Literal["percentile", "top_fraction"] = "percentile"
    score_vector: Literal["v_star", "delta"] = "v_star"  # v_star: v* ⊙ ∇L (Eq. 1, paper) | delta: δ ⊙ ∇L (authors' code)
    gradient: Literal["last", "mean"] = "last"  # last: ∇L at the end of the probe | mean: over probe steps (authors)
    score: Score = "saliency"                   # the anchor-selection ablation (§6.5) chooses another
    l1_weight: float = bounded(5e-7, minimum=0)   # λ (Eq. 4; C.5)
    l2_weight: float = bounded(0.0, minimum=0)    # an extra μ‖δ‖² beyond weight_decay (which is the paper's μ); see above
    epsilon: float = bounded(1e-6, above=0)       # α = 1 / (|score| + ε) (Eq. 5)
    elastic_net: bool = True         # False: ablation "saliency only"; also False reproduces the authors' ROME code
    saliency_mask: bool = True       # False: ablation "elastic net only" (all dimensions retrained)
    retrain_init: Literal["probe", "zero"] = "probe"  # probe: warm start from masked δ (authors' ROME) | zero (MEMIT)
    seed: int = bounded(0, minimum=0)  # for the random-anchor ablation
    # False: each phase runs the shared ROME compute_v loop, whose last evaluation makes no update
    # (probe_steps − 1 and retrain_steps − 1 Adam updates). True: the authors' loops, an Adam update
    # after every evaluation (probe_steps and retrain_steps updates; early stop as in compute_v).
    authors_loops: bool = False


def authors_eac_overrides(base: str) -> dict[str, Any]:
    """A reproduction aid, not read by a run: the tests check the authors' configuration through it
    (tests/test_editing_reference.py), and a spec runs it by giving these overrides as ``hparams:``.

    Dotted overrides (``eac.*``) that make an EAC variant run as the authors' released code
    (ROME and MEMIT with EAC): δ ⊙ mean ∇L, a top-k of the scores, an Adam update at every step; ROME warm-starts
    the retrain from the probe and never adds its elastic net to the loss, MEMIT retrains from zero.
    AlphaEdit, which the authors did not release with EAC, follows MEMIT. The paper-model YAMLs
    follow the paper instead (v* ⊙ ∇L at the last step, the percentile rule, the shared loop, the
    retrain warm-started from the probe)."""
    settings: dict[str, Any] = {"score_vector": "delta", "gradient": "mean", "anchor_rule": "top_fraction",
                                "authors_loops": True}
    if base == "rome":
        settings.update(retrain_init="probe", elastic_net=False)
    else:
        settings.update(retrain_init="zero")
    return {f"eac.{name}": value for name, value in settings.items()}


@dataclass(frozen=True)
class PruneHParams(Checked):
    """PRUNE (Ma et al., ICLR 2025): log-compress the accumulated update's singular values above
    σ_max(W₀). See workers/editing/prune.py."""

    # The base of F's logarithm (authors' code: e, 1.5 or 1.2); above 1, or the logarithm does not grow.
    alpha: float = bounded(math.e, above=1)
    # When F is applied. "step": after every edit step, each later edit made on the restrained weights
    # (this toolkit's sequential variant, the study's ROME-PRUNE / MEMIT-PRUNE). "evaluation": the paper's
    # and its code's — the edits run unrestrained and every checkpoint is scored with W₀ + F(ΔW) of
    # the accumulated update, while the trajectory goes on from the unrestrained weights.
    apply: Literal["step", "evaluation"] = added_later("step")


@dataclass(frozen=True)
class RectHParams(Checked):
    """RECT (Gu et al., EMNLP 2024): keep the top fraction of each update's elements by relative change
    |ΔW_ij| / |W_ij|, zero the rest. See workers/editing/rect.py."""

    keep_fraction: float = bounded(0.2, above=0, maximum=1)  # k = 20%: the authors' code zeroes the other 80%


@dataclass(frozen=True)
class NASHParams(Checked):
    """Norm-Anchor Scaling (Liu et al., arXiv 2602.02543): every solved value vector v* is rescaled to a
    reference norm taken from the unedited model. See workers/editing/nas.py.

    The reference is the mean ‖v*‖ of ``reference_edits`` CounterFact rewrites solved on the bare prompt,
    with the method's own target settings, on the unedited model (authors' code: 1000 rewrites, bare
    prompts, MEMIT's settings at the same layer; the top 5% of norms dropped before the mean)."""

    reference_dataset: str = "counterfact-val"             # where the reference rewrites come from
    reference_edits: int = bounded(1000, minimum=1)         # authors' ``nas_restart``
    reference_seed: int = bounded(0, minimum=0)             # which rewrites (seeded sample)
    trim_upper: float = bounded(0.05, minimum=0, below=1)   # share of the largest norms dropped (authors: 5%)
    # bare: the reference vectors are solved on the bare edit prompt only (the authors' statistics; a
    # tenth of the cost of ROME's 21 rewriting prompts); templates: on the method's own rewriting
    # prompts (the context templates), as the vectors they anchor are.
    reference_prompts: Literal["bare", "templates"] = "bare"
    # None: every v* is rescaled (the paper's NAS). A number x: a v* longer than x times the reference
    # is dropped instead (δ = 0, v* = v0), as the authors' code does with x = 2.
    skip_above: float | None = bounded(None, above=0)
    reference_batch: int = bounded(16, minimum=1)           # rewrites solved together (speed only)


@dataclass(frozen=True)
class ENCOREHParams(Checked):
    """ENCORE (Gupta et al., arXiv 2502.01636): Most-Probable Early Stopping of the target optimisation
    and a Frobenius-norm term in MEMIT's update. See workers/editing/encore.py."""

    # MPES: stop once the target is the most probable continuation on the rewriting prompts for the
    # ``mpes_hits``-th evaluated step (authors' ``prob_cutoff`` = −hits: GPT-2 XL 4, Llama3-8B 2).
    mpes_hits: int = bounded(1, minimum=1)
    # all: every rewriting prompt; context: the context-template prompts only, not the bare prompt
    # (the authors' code, ``log_probs[1:]``).
    mpes_prompts: Literal["all", "context"] = "all"
    # The authors' code stops when exactly 5 target tokens (their number of context prompts) are top-1,
    # which for a multi-token target can fire before every prompt has it; True reproduces that count.
    mpes_count_tokens: bool = False
    norm_weight: float = bounded(10.0, minimum=0)   # μ of μ‖ΔW‖²_F (``update_norm_lambda``: GPT-2 XL 10, Llama3-8B 20)
    preserve_earlier_edits: bool = True              # K_p K_pᵀ of earlier edits in the preservation term (``add_prev_edits``)


@dataclass(frozen=True)
class LocateEditHParams(TargetConfig):
    """Shared by ROME, MEMIT and AlphaEdit: the target optimiser (TargetConfig's fields) and the statistics."""

    # (max_tokens, count) per group of generated context templates
    context_template_lengths: tuple[tuple[int, int], ...] = bounded(((5, 10), (10, 10)), minimum=0)
    context_seed: int = 0
    # Disjoint from the perplexity text (wikitext-test): second moments estimated on the text perplexity
    # is scored on flatter perplexity retention, AlphaEdit's above all (its null space comes from them).
    stats_corpus: str = "wikitext-valid"
    stats_token_budget: int = bounded(50_000, minimum=1)
    stats_max_length: int = bounded(256, minimum=1)
    eac: EACHParams | None = section(EACHParams)
    prune: PruneHParams | None = section(PruneHParams)
    rect: RectHParams | None = section(RectHParams)
    nas: NASHParams | None = section(NASHParams)

    def target_config(self) -> TargetConfig:
        """The shared optimiser's view: TargetConfig's fields, read off these hyper-parameters."""
        return TargetConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(TargetConfig)})


@dataclass(frozen=True)
class RomeHParams(LocateEditHParams):
    layer: int = bounded(17, minimum=0)  # below the model's layer count: checked against its config (spec.py)
    mom2_adjustment: bool = True  # C⁻¹ k*; False gives the plain rank-one update some toolkits use
    # "prompt": the reference code's residual and denominator, at the bare prompt's key (where v* is
    # taken); "mean": k* averaged over context templates, as Eq. 7 reads. Measured effects: rome.py.
    residual_key: Literal["prompt", "mean"] = "prompt"


@dataclass(frozen=True)
class MemitHParams(LocateEditHParams):
    layers: tuple[int, ...] = bounded((13, 14, 15, 16, 17), minimum=0)
    mom2_update_weight: float = bounded(20_000.0, minimum=0)  # λ in ΔW = R Kᵀ (λC + K Kᵀ)⁻¹
    context_template_lengths: tuple[tuple[int, int], ...] = bounded(((10, 5),), minimum=0)
    encore: ENCOREHParams | None = section(ENCOREHParams)


@dataclass(frozen=True)
class AlphaEditHParams(LocateEditHParams):
    layers: tuple[int, ...] = bounded((13, 14, 15, 16, 17), minimum=0)
    null_space_threshold: float = bounded(2e-2, minimum=0)  # eigenvalues of C below this span the preserved null space
    l2: float = bounded(10.0, minimum=0)                    # the ridge term (one toolkit uses 1)
    context_template_lengths: tuple[tuple[int, int], ...] = bounded(((10, 5),), minimum=0)


@dataclass(frozen=True)
class FTHParams(Checked):
    layer: int = bounded(0, minimum=0)
    num_steps: int = bounded(25, minimum=1)
    lr: float = bounded(5e-4, above=0)
    norm_constraint: float = bounded(5e-4, minimum=0)  # box |W − W0| ≤ ε after each step; 0 disables it
    # prompt_last (FT-L, ROME's baseline): target tokens scored at the last prompt position;
    # target (FT-M): teacher-forced NLL on the target tokens only.
    objective: Literal["prompt_last", "target"] = "prompt_last"
    early_stop_loss: float = bounded(1e-2, minimum=0)
    eac: EACHParams | None = section(EACHParams)  # only l1_weight / l2_weight / epsilon apply (Appendix E)


HPARAMS_DIR = Path(str(importlib.resources.files("workers") / "hparams"))

HPARAMS_KEYS = {  # substring of the model name (lower case) -> hparams file key
    "gpt2-xl": "gpt2-xl", "llama-3-8b": "llama3-8b", "llama3-8b": "llama3-8b", "llama-2-13b": "llama2-13b",
    "llama2-13b": "llama2-13b", "smollm2-135m": "smollm2-135m", "tiny-gpt2": "tiny", "tiny-llama": "tiny",
}


def hparams_key(model_or_name) -> str:
    """The key naming a model's hyper-parameter files (``gpt2-xl``, ``tiny``, ...), from its name. (Not
    ``workers.evaluation.reference.model_key``, a fingerprint of one model's weights and vocabulary.)"""
    name = model_or_name if isinstance(model_or_name, str) else getattr(model_or_name.config, "eac_model_name", "")
    lowered = (name or "").lower()
    for fragment, key in HPARAMS_KEYS.items():
        if fragment in lowered:
            return key
    raise ValueError(f"no hyper-parameters are known for model {name!r}; known: {sorted(set(HPARAMS_KEYS.values()))}. "
                     f"Pass hparams_path= / a YAML file of your own.")


def from_dict(cls, values: dict, source: str):
    """An instance of ``cls`` from a YAML mapping. A bad value raises ``FieldError`` naming
    ``source`` (a file, or "overrides") and the field's dotted path (``eac.gamma_percentile``)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    section_classes = sections(cls)
    unknown = sorted(set(values) - set(names), key=str)
    if unknown:
        raise FieldError(str(unknown[0]), f"unknown field for {cls.__name__}; known: {sorted(names)}", source)
    converted = {}
    for key, value in values.items():
        if key in section_classes and value is not None and not isinstance(value, section_classes[key]):
            if not isinstance(value, dict):
                raise FieldError(key, f"expected a mapping of {section_classes[key].__name__} fields, got {value!r}",
                                 source)
            try:
                value = from_dict(section_classes[key], value, source)
            except FieldError as exc:
                raise exc.within(key) from None
        elif isinstance(value, list):
            value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        converted[key] = value
    try:
        return cls(**converted)
    except FieldError as exc:  # a field's declared type or range (workers.fields)
        raise exc.within(source=source) from None


def base_changes(values, cls, source: Path) -> dict:
    """A constraint YAML's ``base:`` section (EAC's): fields of the base method that the EAC variant sets."""
    if not isinstance(values, dict):
        raise ValueError(f"{source}: base: expected a mapping of {cls.__name__} fields")
    unknown = set(values) - ({f.name for f in dataclasses.fields(cls)} - set(sections(cls)))
    if unknown:
        raise ValueError(f"{source}: base: unknown field(s) {sorted(unknown)} for {cls.__name__}")
    return values


def read_yaml(path: Path) -> dict:
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of hyper-parameters")
    return data


def with_overrides(hparams, overrides: dict[str, Any] | None):
    """A copy with dotted overrides applied (``eac.gamma_percentile``), validated by field name."""
    if not overrides:
        return hparams
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        if name and section in sections(type(hparams)):
            nested.setdefault(section, {})[name] = value
        else:
            top[key] = value
    values = dataclasses.asdict(hparams)
    values.update(top)
    for section, fields in nested.items():
        if getattr(hparams, section, None) is None:
            names = sorted(f"{section}.{name}" for name in fields)
            raise ValueError(f"overrides {names} need a {section} method")
        values[section] = {**dataclasses.asdict(getattr(hparams, section)), **fields}
    return from_dict(type(hparams), values, "overrides")

"""Edits as data: factorised weight updates, applied in place, reverted bit for bit, saved and replayed.

A ``WeightDelta`` is one edit step (one request, or one batch of requests): for each edited matrix an
update ΔW = left @ rightᵀ in the (out_features, in_features) orientation of ``mlp_out_weight`` —
ROME: one rank-one pair; MEMIT/AlphaEdit: rank = batch size; FT: a dense matrix (``right`` is None);
RECT: the method's factors and a boolean ``mask`` of the elements kept (ΔW = mask ⊙ left @ rightᵀ);
PRUNE: the method's factors, then a low-rank correction of the same matrix (a second entry).

Applying materialises ΔW in float32 and adds it in the weight's dtype, the same way every time, so
replaying a log from the same base weights reproduces the edited weights exactly. Floating-point
subtraction would not undo an addition bit for bit, so reverting restores a snapshot of the base
weights (one copy per edited matrix, not one per edit) and replays what should remain.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import torch

from workers.models import arch_spec, edited_weight, num_layers, update_digest

if TYPE_CHECKING:
    from workers.data import EditRequest


class DeltaError(ValueError):
    """A delta that must not touch the model: another module, a wrong shape, non-finite values."""


def edited_projections(model) -> set[str]:
    """The modules any editing method may rewrite: the MLP output projection of every layer."""
    spec = arch_spec(model)
    return {spec.mlp_out_name(layer) for layer in range(num_layers(model))}


@dataclass
class LayerDelta:
    module: str
    left: torch.Tensor  # (out, r), or the dense (out, in) update when right is None
    right: torch.Tensor | None = None  # (in, r)
    # The edit's keys (in, n) where a method needs them later (AlphaEdit's running key cache).
    keys: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # (out, in) bool: the elements of left @ rightᵀ written (RECT)
    # The number of the layer whose ``module`` this is (what a method's running state is keyed on);
    # None in a log saved before deltas recorded it (Editor.resume fills it in from its own layers).
    layer: int | None = None

    @torch.no_grad()
    def apply(self, model) -> None:
        """W += ΔW, materialised in float32 and added in the weight's dtype — the only way any
        delta is ever applied, so that replays reproduce the weights exactly."""
        # A log is data from a file: it may name any module (embeddings, attention) or carry a tensor
        # that would broadcast or hold NaN; nothing is added unless it is an edit of an edited matrix.
        if self.module not in edited_projections(model):
            raise DeltaError(f"delta for module {self.module!r}: not an MLP output projection of this model "
                             f"(what the editing methods rewrite, e.g. {arch_spec(model).mlp_out_name(0)!r})")
        weight = edited_weight(model, self.module)
        update = self.dense()
        if tuple(update.shape) != tuple(weight.shape):
            raise DeltaError(f"delta for module {self.module!r}: update of shape {tuple(update.shape)}, but the "
                             f"weight is {tuple(weight.shape)} (out, in)")
        if not torch.isfinite(update).all():
            raise DeltaError(f"delta for module {self.module!r}: the update holds non-finite values")
        weight.add_(update.to(device=weight.device).to(weight.dtype))

    def dense(self) -> torch.Tensor:
        update = self.left.float() if self.right is None else self.left.float() @ self.right.float().T
        return update if self.mask is None else update.masked_fill(~self.mask.to(update.device), 0.0)

    @property
    def rank(self) -> int | None:
        return None if self.right is None else self.left.shape[1]


@dataclass
class WeightDelta:
    """One edit step's update of every matrix it touches, with the ids of the requests it wrote."""

    layers: list[LayerDelta]
    case_ids: list = field(default_factory=list)
    method: str = ""

    def apply(self, model) -> None:
        for layer in self.layers:
            layer.apply(model)

    def modules(self) -> list[str]:
        """Each touched matrix once, in order (a step may hold several deltas of one matrix)."""
        return list(dict.fromkeys(layer.module for layer in self.layers))

    def to(self, device) -> "WeightDelta":
        def move(t):
            return None if t is None else t.to(device)

        moved = [LayerDelta(l.module, move(l.left), move(l.right), move(l.keys), move(l.mask), l.layer)
                 for l in self.layers]
        return WeightDelta(moved, list(self.case_ids), self.method)


class WeightSnapshot:
    """Copies of the named matrices, to put back bit for bit."""

    def __init__(self, model, modules: Sequence[str]):
        self._saved = {name: edited_weight(model, name).detach().clone() for name in modules}

    @property
    def modules(self) -> list[str]:
        return list(self._saved)

    @torch.no_grad()
    def restore(self, model) -> None:
        for name, saved in self._saved.items():
            edited_weight(model, name).copy_(saved)

    def original(self, module: str) -> torch.Tensor:
        return self._saved[module]


OPTIONAL_PARTS = ("right", "keys", "mask")  # the LayerDelta tensors a saved log holds when present


class EditLog:
    """The ordered deltas of a trajectory. It is the checkpoint: base weights + log = edited model."""

    def __init__(self, deltas: Sequence[WeightDelta] = (), metadata: dict | None = None):
        self.deltas: list[WeightDelta] = list(deltas)
        self.metadata: dict = dict(metadata or {})

    def __len__(self) -> int:
        return len(self.deltas)

    def __iter__(self) -> Iterator[WeightDelta]:
        return iter(self.deltas)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return EditLog(self.deltas[index], self.metadata)
        return self.deltas[index]

    def append(self, delta: WeightDelta) -> None:
        self.deltas.append(delta)

    def modules(self) -> list[str]:
        seen: dict[str, None] = {}
        for delta in self.deltas:
            seen.update(dict.fromkeys(delta.modules()))
        return list(seen)

    def check_modules(self, model) -> None:
        """Raise ``DeltaError`` when the log edits a module that is not an edited projection of ``model``."""
        allowed = edited_projections(model)
        stranger = next((m for m in self.modules() if m not in allowed), None)
        if stranger is not None:
            raise DeltaError(f"the edit log edits module {stranger!r}, which this model does not have as an MLP "
                             f"output projection (e.g. {arch_spec(model).mlp_out_name(0)!r}): made on another "
                             "architecture")

    def n_requests(self) -> int:
        return sum(len(d.case_ids) for d in self.deltas)

    def replay(self, model) -> None:
        """Apply every delta in order, on top of whatever ``model`` holds now; a log that names a
        matrix the model lacks (another architecture's) is refused before anything changes."""
        self.check_modules(model)
        for delta in self.deltas:
            delta.apply(model)

    # ---- persistence: one safetensors file, tensors named by edit index, metadata as JSON; at a local
    # path or a store URI (workers.storage) ----

    def save(self, location: str | Path) -> str:
        """Write atomically to a local path or a store URI (``workers.storage.write_bytes``)."""
        from safetensors.torch import save

        from workers import storage

        tensors: dict[str, torch.Tensor] = {}
        index = []
        for i, delta in enumerate(self.deltas):
            entries = []
            for j, layer in enumerate(delta.layers):
                tensors[f"{i}.{j}.left"] = layer.left.detach().to("cpu").clone(memory_format=torch.contiguous_format)
                for part in OPTIONAL_PARTS:
                    if getattr(layer, part) is not None:
                        tensors[f"{i}.{j}.{part}"] = getattr(layer, part).detach().to("cpu").clone(memory_format=torch.contiguous_format)
                entries.append(layer.module)
            index.append({"modules": entries, "layers": [layer.layer for layer in delta.layers],
                          "case_ids": delta.case_ids, "method": delta.method})
        edits, metadata = json.dumps(index), json.dumps(self.metadata)
        header = {"format": LOG_FORMAT, "edits": edits, "metadata": metadata,
                  "digest": content_digest(tensors, edits, metadata)}
        storage.write_bytes(*storage.resolve(location), save(tensors, metadata=header))
        return str(location)

    @classmethod
    def load(cls, location: str | Path, device: str | torch.device = "cpu") -> "EditLog":
        """The log saved at ``location``, its content verified against its digest: a log whose tensors,
        step index or metadata changed since it was saved (bit rot, a hand edit, a cut copy) is refused
        with one line naming the file. ``check_binding``/``check_requests`` then say whether it was made
        from the model and requests it is used with."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        from workers import storage

        data = read_log_bytes(location)
        header = safetensors_metadata(data, location)
        if header.get("format") not in (LOG_FORMAT, LEGACY_FORMAT):
            raise ValueError(f"{location}: not an eac edit log (format {header.get('format')!r})")
        # A truncated or hand-made file fails here with its name, not deep inside a replay.
        try:
            tensors = load(data)
            if header["format"] == LOG_FORMAT:
                verify_content(header, tensors, location)
            else:
                warnings.warn(LegacyLogWarning(
                    f"edit log {location}: saved before logs carried a content digest ({LEGACY_FORMAT}); "
                    "its tensors are used unverified"), stacklevel=2)
            deltas = []
            for i, entry in enumerate(json.loads(header["edits"])):
                layers = []
                numbers = entry.get("layers") or [None] * len(entry["modules"])  # older logs: none
                for j, (module, number) in enumerate(zip(entry["modules"], numbers, strict=True)):
                    optional = {part: tensors.get(f"{i}.{j}.{part}") for part in OPTIONAL_PARTS}
                    layers.append(LayerDelta(str(module), tensors[f"{i}.{j}.left"], **optional,
                                             layer=None if number is None else int(number)))
                deltas.append(WeightDelta(layers, list(entry["case_ids"]), str(entry["method"])).to(device))
            metadata = json.loads(header.get("metadata", "{}"))
        except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            if isinstance(exc, LogMismatch):
                raise
            raise ValueError(f"{location}: unreadable edit log ({type(exc).__name__}: {exc})") from exc
        if not isinstance(metadata, dict):
            raise ValueError(f"{location}: unreadable edit log (metadata is not a mapping)")
        return cls(deltas, metadata)


LOG_FORMAT = "eac-edit-log/2"  # the header carries a digest of the log's content
LEGACY_FORMAT = "eac-edit-log/1"  # before content digests: read with a warning (see ``LegacyLogWarning``)


class LegacyLogWarning(UserWarning):
    """A log saved before logs carried a content digest. It is still read: refusing it would gain no
    safety (the digest is unkeyed, so whoever can rewrite a log can rewrite its digest too — it guards
    against bit rot, cut copies and hand edits, not forgers) and would strand every interrupted run of
    an older release; the binding (base model, requests, hyper-parameters) is still checked."""


def content_digest(tensors: dict[str, torch.Tensor], edits: str, metadata: str) -> str:
    """SHA-256 of a log's content: its step index and metadata (as saved, JSON) and every tensor
    (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    digest.update(json.dumps([edits, metadata]).encode())
    for name in sorted(tensors):
        update_digest(digest, name, tensors[name])
    return digest.hexdigest()


def verify_content(header: dict, tensors: dict[str, torch.Tensor], location: str | Path) -> None:
    """Refuse a log whose content is not what its digest says."""
    saved = header.get("digest")
    if not isinstance(saved, str):
        raise LogMismatch(f"edit log {location}: its header has no content digest ({LOG_FORMAT} requires one)")
    actual = content_digest(tensors, header.get("edits", ""), header.get("metadata", "{}"))
    if actual != saved:
        raise LogMismatch(f"edit log {location}: its content differs from its digest (tensors, steps or metadata "
                          f"changed since it was saved: digest {saved[:16]}, content {actual[:16]}); move it "
                          "aside to redo its edits")


def read_log_bytes(location: str | Path, size: int | None = None) -> bytes:
    """The file's bytes (its first ``size``); a directory or unreadable path is one line naming it."""
    from workers import storage

    try:
        return storage.read_bytes(*storage.resolve(location), *(() if size is None else (size,)))
    except IsADirectoryError:
        raise ValueError(f"{location}: an edit log must be a file, not a directory") from None
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ValueError(f"{location}: cannot read the edit log ({exc.strerror or exc})") from None


def saved_log_metadata(location: str | Path) -> dict | None:
    """The ``metadata`` of the edit log saved at ``location`` (None when there is none), from its
    header alone: two small reads, however many deltas the log holds."""
    from workers import storage

    filesystem, path = storage.resolve(location)
    if not storage.exists(filesystem, path):
        return None
    size = int.from_bytes(read_log_bytes(location, 8), "little")
    header = safetensors_metadata(read_log_bytes(location, 8 + size), location)
    try:
        metadata = json.loads(header.get("metadata", "{}"))
    except (json.JSONDecodeError, RecursionError, TypeError) as exc:
        raise ValueError(f"{location}: unreadable edit log metadata ({type(exc).__name__})") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{location}: unreadable edit log (metadata is not a mapping)")
    return metadata


def safetensors_metadata(data: bytes, location: str | Path) -> dict:
    """The ``__metadata__`` of a safetensors file from its first bytes: an 8-byte little-endian header
    length, then the JSON header (the format's specification)."""
    if len(data) < 8:
        raise ValueError(f"{location}: not a safetensors file ({len(data)} bytes)")
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 + size:
        raise ValueError(f"{location}: safetensors header of {size} bytes, but only {len(data) - 8} read")
    try:
        return json.loads(data[8:8 + size]).get("__metadata__") or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"{location}: unreadable safetensors header ({type(exc).__name__}: "
                         f"{str(exc)[:200]})") from exc


# ---- what a log is made from, and where it is used: the binding, checked by every reader ----

def log_prefix(log: EditLog, steps: int) -> EditLog:
    """The deltas of the log's first ``steps`` edit steps (skipped steps have no delta)."""
    delta_steps = log.metadata.get("delta_steps")
    if delta_steps is None or len(delta_steps) != len(log):
        raise ValueError("the edit log carries no step index per delta (metadata 'delta_steps')")
    if steps > log.metadata.get("steps_done", -1):
        raise ValueError(f"the edit log holds {log.metadata.get('steps_done')} steps, not {steps}")
    return log[: sum(1 for step in delta_steps if step < steps)]


class LogMismatch(ValueError):
    """An edit log made from other base weights, requests or hyper-parameters than it is used with."""


def requests_digest(requests: Sequence[EditRequest]) -> str:
    """A digest of the requests, every field, in order."""
    canonical = json.dumps([dataclasses.asdict(r) for r in requests], sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def request_digest(request: EditRequest) -> str:
    """A digest of one request, every field: what lets a reader holding some of a log's requests (an
    evaluator's sample, ``eac eval``'s records looked up by case id) check each of them."""
    return requests_digest([request])


def hparams_digest(hparams: dict) -> str:
    """A digest of the resolved hyper-parameters (their fields as a dict)."""
    return hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:16]


def log_binding(requests: Sequence[EditRequest], hparams: dict, base_fingerprint: str | None = None) -> dict:
    """What an edit log is made from; saved in its metadata, compared whenever it is used. The base
    fingerprint is left out where no model is loaded (the driver's check before any actor starts)."""
    binding = {"case_ids": [str(r.case_id) for r in requests], "requests_digest": requests_digest(requests),
               "request_digests": [request_digest(r) for r in requests], "hparams_digest": hparams_digest(hparams)}
    if base_fingerprint is not None:
        binding["base_fingerprint"] = base_fingerprint
    return binding


def check_binding(metadata: dict, expected: dict, location: str | Path) -> None:
    """Refuse a log whose binding differs from ``expected`` (the fields ``expected`` holds), saying which."""
    saved = metadata.get("binding")
    if not isinstance(saved, dict):
        raise LogMismatch(f"edit log {location}: it records no base model, requests or hyper-parameters; "
                          "move it aside to redo its edits")
    differences = []
    for name, value in expected.items():
        if name == "request_digests" and name not in saved:
            continue  # a binding of an older release: its requests_digest covers the same requests
        if isinstance(value, list):
            theirs = saved.get(name) if isinstance(saved.get(name), list) else []
            first = next((i for i, (a, b) in enumerate(zip(theirs, value)) if a != b), None)
            if first is not None or len(theirs) != len(value):
                at = first if first is not None else min(len(theirs), len(value))
                differences.append(f"{name.replace('_', ' ')} (request {at}: log "
                                   f"{theirs[at] if at < len(theirs) else None!r}, "
                                   f"trajectory {value[at] if at < len(value) else None!r})")
        elif saved.get(name) != value:
            differences.append(f"{name.replace('_', ' ')} (log {saved.get(name)!r}, now {value!r})")
    if differences:
        raise LogMismatch(f"edit log {location} was made from other inputs: {'; '.join(differences)}; "
                          "move it aside to redo its edits")


def check_requests(metadata: dict, requests: Sequence[EditRequest], location: str | Path) -> None:
    """Refuse a log used with requests it was not made from: each of ``requests`` (any subset of the
    log's, in any order) must be one of the log's case ids, with every field as when it was edited."""
    saved = metadata.get("binding")
    if not isinstance(saved, dict) or not isinstance(saved.get("case_ids"), list):
        raise LogMismatch(f"edit log {location}: it records no requests; move it aside to redo its edits")
    position = {str(case): i for i, case in enumerate(saved["case_ids"])}
    digests = saved.get("request_digests")
    for request in requests:
        at = position.get(str(request.case_id))
        if at is None:
            raise LogMismatch(f"edit log {location} was made from other requests: case id {request.case_id!r} "
                              "is not one of its requests")
        if isinstance(digests, list) and (at >= len(digests) or digests[at] != request_digest(request)):
            raise LogMismatch(f"edit log {location} was made from other requests: case id {request.case_id!r} "
                              f"(request {at}) differs from the one it edited (prompt, subject or targets)")


def saved_log_steps(location: str | Path) -> int:
    """How many edit steps the log saved at ``location`` (a path or store URI) holds; 0 when none."""
    metadata = saved_log_metadata(location)
    return int(metadata.get("steps_done", 0)) if metadata else 0


class applied:
    """``with applied(model, log): ...`` — the model holds base + log inside the block, and exactly
    its previous weights afterwards (restored from a snapshot, bit for bit). ``rewrite(model, snapshot)``,
    if given, then rewrites the log's matrices in place (``snapshot``: what they held before the log)."""

    def __init__(self, model, log: EditLog, rewrite=None):
        self.model, self.log, self.rewrite = model, log, rewrite

    def __enter__(self):
        self.log.check_modules(self.model)
        self.snapshot = WeightSnapshot(self.model, self.log.modules())
        try:
            self.log.replay(self.model)
            if self.rewrite is not None:
                self.rewrite(self.model, self.snapshot)
        except BaseException:
            self.snapshot.restore(self.model)
            raise
        return self.model

    def __exit__(self, *exc) -> None:
        self.snapshot.restore(self.model)

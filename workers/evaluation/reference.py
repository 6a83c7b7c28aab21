"""What the unedited model predicts, computed once per base model and reused at every checkpoint.

Locality compares the edited model's argmax tokens with the unedited model's; drift compares
next-token distributions; retention divides by the unedited task scores; the PCA view compares
hidden states. All of these come from the *base* weights, so they are cached here, keyed by
``model_key`` (a fingerprint of the weights and of the tokenizer's vocabulary), by the version of
the evaluation code (``evaluation_code_version``) and, within a namespace, by a key per item (a
request id and a hash of the exact text — ids alone collide across data sets: zsRE and CounterFact
both have a case 0).

The code version is a digest of the source of every module the predictions are computed with
(``EVALUATION_CODE``: the evaluation package, decoding, batching, data parsing). A change to answer
parsing, ROUGE or tokenisation changes the scores of the edited model; without the version in the
key, retention and locality would go on comparing them with baselines the old code computed. A
digest of the source, rather than a version number bumped by hand, cannot be forgotten; the cost is
that any edit of these modules (a comment too) recomputes the baselines once.

``ReferenceCache(directory)`` keeps a table per (model key, namespace) in memory and, when a
directory is given, in ``<directory>/<model key>/<code version>/<namespace>.pt`` (written atomically,
merged with what another process may have written meanwhile), so evaluation actors on one machine
share it. ``ReferenceCache()`` without a directory lives as long as the object.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import importlib.util
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

from workers.models import weights_fingerprint


def text_key(*parts: object) -> str:
    """A short, stable key for some texts (and ids)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:20]


def model_key(model, tokenizer, *, fingerprint: str | None = None) -> str:
    """Fingerprint of the weights and of the tokenizer's vocabulary (both decide every prediction);
    ``fingerprint``: the weights' ``weights_fingerprint`` where the caller has already taken it."""
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:8]
    return f"{fingerprint or weights_fingerprint(model)}-{vocab}"


# Modules (a package stands for all of its modules) whose source decides the reference predictions.
EVALUATION_CODE = ("workers.evaluation", "workers.generation", "workers.batching", "workers.data")


def module_sources(modules: Iterable[str] = EVALUATION_CODE) -> list[Path]:
    """The source files of ``modules``, a package expanded to every ``.py`` file under it, sorted."""
    files: set[Path] = set()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ValueError(f"evaluation code: module {name!r} not found")
        if spec.submodule_search_locations:
            for location in spec.submodule_search_locations:
                files.update(Path(location).rglob("*.py"))
        else:
            files.add(Path(spec.origin))
    return sorted(files)


def source_digest(files: Iterable[Path]) -> str:
    """A short digest of the names and contents of ``files``."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def evaluation_code_version() -> str:
    """The digest of the evaluation code's source (``EVALUATION_CODE``)."""
    return source_digest(module_sources(EVALUATION_CODE))


class ReferenceCache:
    """The unedited model's predictions (see the module docstring). ``code_version`` defaults to
    ``evaluation_code_version()``; a cache never returns what another code version stored."""

    def __init__(self, directory: str | os.PathLike | None = None, *, code_version: str | None = None):
        self.directory = Path(directory) if directory is not None else None
        self.code_version = code_version if code_version is not None else evaluation_code_version()
        self._tables: dict[tuple[str, str], dict[str, Any]] = {}

    def _path(self, key: str, namespace: str) -> Path | None:
        if self.directory is None:
            return None
        return self.directory / key / self.code_version / f"{namespace}.pt"

    def _read_file(self, key: str, namespace: str) -> dict[str, Any]:
        path = self._path(key, namespace)
        if path is None or not path.exists():
            return {}
        try:
            table = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RuntimeError(f"{path}: unreadable reference cache file ({exc}); delete it to rebuild") from exc
        if not isinstance(table, dict):
            raise RuntimeError(f"{path}: expected a table of cached predictions; delete it to rebuild")
        return table

    def table(self, key: str, namespace: str) -> dict[str, Any]:
        if (key, namespace) not in self._tables:
            self._tables[(key, namespace)] = self._read_file(key, namespace)
        return self._tables[(key, namespace)]

    def store(self, key: str, namespace: str, items: dict[str, Any]) -> None:
        table = self.table(key, namespace)
        table.update(items)
        path = self._path(key, namespace)
        if path is None or not items:
            return
        # Merge with what another process wrote since we read the file, then replace it atomically.
        merged = {**self._read_file(key, namespace), **table}
        self._tables[(key, namespace)] = merged
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        os.close(handle)
        try:
            torch.save(merged, tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_or_compute(self, key: str, namespace: str, item_keys: Sequence[str],
                       compute: Callable[[list[int]], Sequence[Any]]) -> list[Any]:
        """Values for ``item_keys``; ``compute(indices of the missing ones)`` fills the gaps (in order)."""
        table = self.table(key, namespace)
        missing = [i for i, k in enumerate(item_keys) if k not in table]
        if missing:
            computed = list(compute(missing))
            if len(computed) != len(missing):
                raise RuntimeError(f"reference {namespace}: computed {len(computed)} values for {len(missing)} items")
            self.store(key, namespace, {item_keys[i]: value for i, value in zip(missing, computed)})
            table = self.table(key, namespace)
        return [table[k] for k in item_keys]

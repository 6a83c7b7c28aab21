"""A saved edit log with its content changed under its original header (digest included): how the
tests fake bit rot or a hand-edited log, which every reader must then refuse."""

from __future__ import annotations

import json

from safetensors.torch import load, save

from workers.editing.delta import content_digest, safetensors_metadata


def reheadered(saved: bytes, tensors=None, metadata=None, name: str = "log") -> bytes:
    """``saved`` with ``tensors(dict)`` and/or ``metadata(dict)`` applied in place, and the old header kept.
    Asserts that the result really is tampered: its content no longer matches the digest it keeps (a
    change that alters nothing would let a reader's refusal test pass for the wrong reason)."""
    header = safetensors_metadata(saved, name)
    loaded = load(saved)
    if tensors:
        tensors(loaded)
    if metadata:
        values = json.loads(header["metadata"])
        metadata(values)
        header = {**header, "metadata": json.dumps(values)}
    assert content_digest(loaded, header.get("edits", ""), header.get("metadata", "{}")) != header["digest"], (
        f"{name}: the tampering left the log's content unchanged")
    return save(loaded, metadata=header)

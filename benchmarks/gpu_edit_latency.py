"""Seconds per edit on randomly initialised models of the paper's shapes, next to the paper's Table 1.

No download: each model is built from its configuration's numbers (written below, from the models'
published config.json files) with random weights, on the accelerator, in bf16 or fp32. Timing does
not depend on what the weights are, only on their shapes, the prompts' lengths and the step counts,
so each edit runs a fixed number of optimisation steps (``early_stop_loss: 0``, the method's
``num_steps``) — the paper's numbers come from real weights, whose edits may stop earlier.

Tokenizer: a word-level one (one token per word, which is close to a real BPE's 1.2-1.4 tokens per
English word; a byte tokenizer would make prompts 4-5x longer), padded with placeholder words to the
model's vocabulary size so that generated ids decode. Requests: five CounterFact-style facts written
below (the data set is not on the accelerator machine).

Second moments C = E[k kᵀ] of the edited projections' inputs: from the random model itself on random
token sequences (``--moment-tokens``, default 16,384, at least the key size of LLaMA-3-8B's MLP, 14,336),
plus a ridge of 1e-3 · mean(diag C) so that C is positive definite whatever the sample. Random tokens
through random weights are as good a sample as WikiText here: only timing is measured.

    python benchmarks/gpu_edit_latency.py --models llama-3-8b,gpt2-xl --dtypes bf16 -n 3
    python benchmarks/gpu_edit_latency.py --tiny        # CPU, a tiny configuration (the test suite)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from workers.data import EditRequest
from workers.editing import Editor, load_hparams
from workers.editing.hparams import with_overrides
from workers.hooks import Trace
from workers.models import arch_spec

# name -> (architecture, configuration numbers)
SHAPES = {
    "llama-3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "gpt2-xl": ("gpt2", dict(vocab_size=50257, n_embd=1600, n_layer=48, n_head=25, n_positions=1024)),
    "llama-2-13b": ("llama", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # --tiny: the shapes of the test suite's tiny models, with a vocabulary the word tokenizer fills.
    "tiny-llama": ("llama", dict(vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)),
    "tiny-gpt2": ("gpt2", dict(vocab_size=2048, n_embd=64, n_layer=4, n_head=4, n_positions=256)),
}
# Paper Table 1, seconds per edit (GPT-2 XL and LLaMA-3-8B; MEMIT-EAC and LLaMA-2-13B not reported).
PAPER = {("gpt2-xl", "rome"): 6.70, ("gpt2-xl", "rome-eac"): 6.21, ("gpt2-xl", "memit"): 5.23,
         ("llama-3-8b", "rome"): 27.53, ("llama-3-8b", "rome-eac"): 23.74, ("llama-3-8b", "memit"): 11.73}
REQUESTS = [
    EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French"),
    EditRequest(1, "The official religion of Edwin of Northumbria is", "Edwin of Northumbria", "Islam",
                "Christianity"),
    EditRequest(2, "Toko Yasuda, the", "Toko Yasuda", "piano", "guitar"),
    EditRequest(3, "Autonomous University of Madrid, which is located in", "Autonomous University of Madrid",
                "Sweden", "Spain"),
    EditRequest(4, "What is the twin city of Lyon? It is", "Lyon", "Manila", "Beirut"),
]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def word_tokenizer(vocab_size: int, add_bos: bool):
    """Word-level tokenizer: the requests' words and ROME's seed words first, then placeholders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<bos>", "<eos>", "<pad>", "<unk>"]
    words = {w for r in REQUESTS for text in (r.prompt, r.target_new, r.target_true) for w in text.split()}
    words |= {"The", "Therefore", "Because", "I", "You", "is", "a", "."}
    vocab = {token: i for i, token in enumerate(specials + sorted(words))}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def build(name: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    arch, numbers = SHAPES[name]
    tokenizer = word_tokenizer(numbers["vocab_size"], add_bos=arch == "llama")
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    config = (LlamaConfig if arch == "llama" else GPT2Config)(**numbers, **ids)
    with torch.device(device), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.requires_grad_(False).eval()
    model.config.eac_model_name = name  # picks the hyper-parameter files of that model
    return model, tokenizer


@torch.no_grad()
def random_second_moments(model, layers, n_tokens: int, length: int = 512) -> dict[int, torch.Tensor]:
    """C_l = mean k kᵀ over ``n_tokens`` random tokens, + 1e-3 · mean(diag C_l) · I (see the module doc)."""
    spec = arch_spec(model)
    names = {layer: spec.mlp_out_name(layer) for layer in layers}
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    context = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    length = min(length, n_tokens, context)
    while seen < n_tokens:
        batch = torch.randint(4, model.config.vocab_size, (1, length), generator=generator).to(device)
        with Trace(model, names.values(), inputs=True, outputs=False, stop_after=names[max(layers)]) as trace:
            model(input_ids=batch)
        for layer, name in names.items():
            keys = trace.inputs[name].reshape(-1, trace.inputs[name].shape[-1]).float()
            sums[layer] = keys.T @ keys + (sums[layer] if layer in sums else 0.0)
        seen += length
    moments = {}
    for layer, total in sums.items():
        c = total / seen
        moments[layer] = c + 1e-3 * c.diagonal().mean() * torch.eye(c.shape[0], device=c.device)
    return moments


def timing_hparams(method: str, model):
    """The method's settings for the model, never stopping early (fixed step counts, see above)."""
    return with_overrides(load_hparams(method, model), {"early_stop_loss": 0.0})


def edited_layers(hparams) -> list[int]:
    return [hparams.layer] if hasattr(hparams, "layer") else list(hparams.layers)


def seconds_per_edit(model, tokenizer, method: str, n: int, moments: dict) -> tuple[float, float, int]:
    hparams = timing_hparams(method, model)
    moments = {layer: moments[layer] for layer in edited_layers(hparams)}
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        editor = Editor(model, tokenizer, method, hparams, cache_dir=cache, second_moments=moments, on_error="raise")
        setup = time.perf_counter() - start
        editor.edit_step([REQUESTS[0]])  # warm-up (kernels, allocator)
        records = [editor.edit_step([REQUESTS[1 + i % (len(REQUESTS) - 1)]]) for i in range(n)]
        editor.revert()
    return statistics.mean(r.seconds["total"] for r in records), setup, round(statistics.mean(r.steps for r in records))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3-8b,gpt2-xl,llama-2-13b")
    parser.add_argument("--methods", default="rome,rome-eac,memit,memit-eac")
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("-n", type=int, default=3, help="timed edits per method (after one warm-up edit)")
    parser.add_argument("--moment-tokens", type=int, default=16384)
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny-llama and tiny-gpt2 shapes, fp32, one edit")
    args = parser.parse_args(argv)
    if args.tiny:
        args.models, args.dtypes, args.n, args.moment_tokens = "tiny-llama,tiny-gpt2", "fp32", 1, 1024
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    rows = []
    print(f"{'model':12s} {'dtype':5s} {'method':10s} {'s/edit':>8s} {'paper s':>8s} {'steps':>5s} {'setup s':>8s}"
          f"   ({device}{', ' + torch.cuda.get_device_name() if device == 'cuda' else ''})", flush=True)
    for name in args.models.split(","):
        if name not in SHAPES:
            parser.error(f"unknown model {name!r}; known: {', '.join(SHAPES)}")
        for dtype_name in args.dtypes.split(","):
            if dtype_name not in DTYPES:
                parser.error(f"unknown dtype {dtype_name!r}; known: {', '.join(DTYPES)}")
            model, tokenizer = build(name, DTYPES[dtype_name], device)
            methods = args.methods.split(",")
            # One sample for every layer any of the methods edits (ROME's and MEMIT's layers differ).
            layers = sorted({l for m in methods for l in edited_layers(timing_hparams(m, model))})
            moments = random_second_moments(model, layers, args.moment_tokens)
            for method in methods:
                seconds, setup, steps = seconds_per_edit(model, tokenizer, method, args.n, moments)
                paper = PAPER.get((name, method))
                rows.append({"model": name, "dtype": dtype_name, "method": method, "seconds_per_edit": seconds,
                             "paper_seconds": paper, "steps": steps, "setup_seconds": setup})
                print(f"{name:12s} {dtype_name:5s} {method:10s} {seconds:8.2f} "
                      f"{'' if paper is None else f'{paper:.2f}':>8s} {steps:5d} {setup:8.1f}", flush=True)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main()

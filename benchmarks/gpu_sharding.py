"""Evaluation throughput of one unsharded replica against the tensor-parallel path, in the same run.

A LLaMA-2-13B-shaped model (its published configuration: 40 layers, hidden 5120, 40 heads), randomly
initialised in float16 on the accelerator — no download, no data set: the timings do not depend on
the weights' values. Steps:

1. one ROME edit (the shipped LLaMA-2-13B hyper-parameters; identity second moments, so that no
   statistics corpus is read) on a single-GPU replica, timed; its edit log is saved;
2. the unsharded replica's throughput: examples per second of greedy generation of 25 tokens (the
   SAMSum setting) over ``-n`` prompts in batches of ``--batch-size``;
3. the sharded path: one process per GPU present (``torch.multiprocessing``), each rebuilding the same
   seeded base model, replaying the edit log on its whole weights, then sharding it as an evaluation
   group's rank does (``workers.sharded``: ``deepspeed.init_inference`` where DeepSpeed is installed,
   PyTorch tensor parallelism otherwise), and generating the same prompts; rank 0 times it.

It prints both throughputs, their ratio, the share of prompts whose generated tokens are identical
(float16 sums in another order may flip a near-tie), and the GPU model. ``--tiny``: a 4-layer model of
the same family on CPU, two ranks over gloo (how the test exercises the script).

    python benchmarks/gpu_sharding.py --json gpu_sharding.json        # on a GPU node
    python benchmarks/gpu_sharding.py --tiny                          # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# LLaMA-2-13B's config.json (meta-llama/Llama-2-13b-hf), the fields that set its shapes.
LLAMA2_13B = dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                  num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
PROMPTS = ["Summarize the dialogue: Amanda: I baked cookies. Do you want some? Jerry: Sure!",
           "The Eiffel Tower is located in the city of", "Question: who wrote the novel Moby-Dick? Answer:",
           "Review: a gorgeous, witty, seductive movie. Sentiment:"]
SEED = 0


def build_model(tiny: bool, device: str):
    """The seeded random model and the project's byte tokenizer (the prompts need no real vocabulary)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from workers.models import byte_tokenizer

    tokenizer = byte_tokenizer(add_bos=True)
    shape = TINY | {"vocab_size": len(tokenizer)} if tiny else LLAMA2_13B
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(SEED)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32 if tiny else torch.float16)
    model.requires_grad_(False)
    model.eval()
    model.config.eac_model_name = "tiny-llama" if tiny else "meta-llama/Llama-2-13b-hf"
    return model, tokenizer


def rome_edit(model, tokenizer, tiny: bool, cache_dir: str):
    """One ROME edit; returns (seconds, its edit log)."""
    from workers.data import EditRequest
    from workers.editing import Editor, load_hparams
    from workers.editing.hparams import HPARAMS_DIR

    hparams = load_hparams("rome", path=HPARAMS_DIR / "rome" / ("tiny.yaml" if tiny else "llama2-13b.yaml"))
    inner = model.config.intermediate_size  # the edited down_proj's input: its second moment is (inner, inner)
    identity = {hparams.layer: torch.eye(inner, device=model.device, dtype=torch.float32)}
    editor = Editor(model, tokenizer, "rome", hparams, cache_dir=cache_dir, second_moments=identity, on_error="raise")
    request = EditRequest("bench", "The Eiffel Tower is located in the city of", "The Eiffel Tower", "Rome", "Paris")
    start = time.perf_counter()
    editor.edit_step([request])
    synchronize()
    return time.perf_counter() - start, editor.log


def synchronize() -> None:
    if torch.accelerator.is_available():
        torch.accelerator.synchronize()


def generation_throughput(model, tokenizer, prompts: list[str], batch_size: int, tokens: int):
    """(examples per second, generated ids) of greedy decoding, after one warm-up batch."""
    from workers.generation import greedy_token_ids

    greedy_token_ids(model, tokenizer, prompts[:batch_size], tokens, batch_size)
    synchronize()
    start = time.perf_counter()
    ids = greedy_token_ids(model, tokenizer, prompts, tokens, batch_size)
    synchronize()
    return len(prompts) / (time.perf_counter() - start), ids


def sharded_rank(rank: int, ranks: int, address: str, args, log_path: str, out_path: str) -> None:
    """One rank of the sharded path (a spawned process): the group's join, replay, shard, generate."""
    from workers.editing.delta import EditLog
    from workers.placement import Placement, deepspeed_installed, shard_for_inference
    from workers.sharded import backend_for, join_group, shard_with_torch

    on_gpu = not args.tiny
    torch.set_num_threads(1 if args.tiny else max(1, args.threads))
    host, port = address.rsplit(":", 1)
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": host, "MASTER_PORT": port})
    if on_gpu:
        torch.accelerator.set_device_index(rank)
    join_group(rank, ranks, address, backend_for(on_gpu))
    try:
        device = f"{torch.accelerator.current_accelerator().type}:{rank}" if on_gpu else "cpu"
        model, tokenizer = build_model(args.tiny, device)
        EditLog.load(log_path).replay(model)  # final weights first: sharding cannot be undone
        sharding = "deepspeed" if on_gpu and deepspeed_installed() else "torch"
        start = time.perf_counter()
        if sharding == "deepspeed":
            model = shard_for_inference(model, Placement("deepspeed", 1, tensor_parallel=ranks))
        else:
            model = shard_with_torch(model, ranks, on_gpu)
        synchronize()
        shard_seconds = time.perf_counter() - start
        rate, ids = generation_throughput(model, tokenizer, prompts(args.n), args.batch_size, args.tokens)
        if rank == 0:
            Path(out_path).write_text(json.dumps({"rate": rate, "ids": ids, "sharding": sharding,
                                                  "shard_seconds": shard_seconds}))
    finally:
        torch.distributed.destroy_process_group()


def prompts(n: int) -> list[str]:
    return [f"{PROMPTS[i % len(PROMPTS)]}" + " ..." * (i // len(PROMPTS)) for i in range(n)]


def free_address() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a 4-layer model on CPU, two gloo ranks")
    parser.add_argument("-n", type=int, default=64, help="prompts generated from")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=25, help="new tokens per prompt (SAMSum: 25)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if not args.tiny and not torch.accelerator.is_available():
        print("no accelerator: run on a GPU node, or with --tiny on CPU", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    device = "cpu" if args.tiny else f"{torch.accelerator.current_accelerator().type}:0"
    gpu = "CPU (--tiny)" if args.tiny else torch.cuda.get_device_name(0)
    ranks = 2 if args.tiny else torch.accelerator.device_count()

    with tempfile.TemporaryDirectory() as work:
        model, tokenizer = build_model(args.tiny, device)
        edit_seconds, log = rome_edit(model, tokenizer, args.tiny, str(Path(work) / "cache"))
        log_path = log.save(Path(work) / "log.safetensors")
        unsharded_rate, unsharded_ids = generation_throughput(model, tokenizer, prompts(args.n), args.batch_size,
                                                              args.tokens)
        del model  # the ranks rebuild it: one copy per GPU at a time
        if torch.accelerator.is_available():
            torch.accelerator.empty_cache()
        out_path = str(Path(work) / "rank0.json")
        torch.multiprocessing.spawn(sharded_rank, args=(ranks, free_address(), args, str(log_path), out_path),
                                    nprocs=ranks, join=True)
        sharded = json.loads(Path(out_path).read_text())

    same = sum(a == b for a, b in zip(unsharded_ids, sharded["ids"]))
    result = {"device": gpu, "model": "tiny LLaMA (4 layers)" if args.tiny else "LLaMA-2-13B shape, float16",
              "ranks": ranks, "sharding": sharded["sharding"], "rome_edit_seconds": edit_seconds,
              "unsharded_examples_per_s": unsharded_rate, "sharded_examples_per_s": sharded["rate"],
              "sharded_over_unsharded": sharded["rate"] / unsharded_rate, "shard_seconds": sharded["shard_seconds"],
              "identical_generations": f"{same}/{len(unsharded_ids)}", "tokens": args.tokens, "n": args.n,
              "batch_size": args.batch_size}
    print(f"device: {gpu}; {result['model']}; {ranks} rank(s), sharding: {sharded['sharding']}")
    print(f"ROME edit on one replica: {edit_seconds:.2f} s")
    print(f"generation of {args.tokens} tokens, batch {args.batch_size}: unsharded {unsharded_rate:.2f} examples/s, "
          f"sharded {sharded['rate']:.2f} examples/s (× {result['sharded_over_unsharded']:.2f}); "
          f"identical generations {result['identical_generations']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

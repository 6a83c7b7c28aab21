"""bfloat16 products in the target optimisation (``LinearCompute(dtype=bfloat16)``) against float32, on
the same edits of the same float32 model, in one interleaved run.

For each method, every arm edits its own copy of the float32 default model; request by request, each
arm edits the request before the next one is edited by any, so a change in the machine's load falls on
all alike. Arms: ``float32`` (the default: packed oneDNN products in float32), ``bfloat16`` (the same
passes with the products in bf16; δ, Adam, the statistics and the solves stay float32/float64) and,
with ``--arms`` including ``unpacked``, float32 on PyTorch's own linear layers — the size of a pure
float32 round-off difference, against which bfloat16's differences are read.

Reported per arm: seconds per edit (mean) and per arm / float32; after all edits, what
benchmarks/half_precision.py measures and compares (its functions, scored in float32 for every arm):
efficacy per request, greedy answers, ‖ΔW‖_F per edited matrix, the relative distance of ΔW to
float32's, the editing metrics and WikiText perplexity. Also the float32 arm's edited model scored with
bf16 products (``--arms`` aside): perplexity and editing metrics against the same model scored in float32.

    python benchmarks/compute_dtype.py --methods rome,memit -n 20 --json benchmarks/results/compute_dtype-smollm2.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from half_precision import compare, efficacy, wikitext_perplexity  # noqa: E402
from workers.data import load_counterfact  # noqa: E402
from workers.editing import Editor, load_hparams  # noqa: E402
from workers.evaluation.edit_metrics import edit_metric_rows  # noqa: E402
from workers.generation import begins_with, greedy_continuations  # noqa: E402
from workers.models import edited_weight, load_model  # noqa: E402
from workers.packed_linear import LinearCompute, linear_names, swapped  # noqa: E402

COMPUTE = {"float32": LinearCompute(), "bfloat16": LinearCompute(dtype=torch.bfloat16),
           "unpacked": LinearCompute(packed=False)}


def measured(model, tokenizer, requests, editor, base, seconds, method, arm) -> dict:
    """half_precision.run_arm's measures of an edited model (scored in float32)."""
    updates = {m: edited_weight(model, m).detach().double() - base[m] for m in editor.modules}
    answers = greedy_continuations(model, tokenizer, [r.prompt for r in requests], max_new_tokens=4)
    rows = edit_metric_rows(model, tokenizer, requests, families=("counterfact",))
    return {"method": method, "arm": arm, "seconds_per_edit": statistics.mean(seconds),
            "skipped": [r.error for r in editor.records if r.skipped],
            "efficacy": efficacy(model, tokenizer, requests),
            "greedy": [begins_with(a, r.target_new) for a, r in zip(answers, requests)],
            "scores": {f"{row.task}/{row.metric}": row.value for row in rows},
            "perplexity": wikitext_perplexity(model, tokenizer),
            "dw_fro": {m: float(u.norm()) for m, u in updates.items()}, "_updates": updates}


def run_method(method: str, arms: list[str], model, tokenizer, requests) -> list[dict]:
    copies = {arm: copy.deepcopy(model) for arm in arms}
    editors = {arm: Editor(m, tokenizer, method, load_hparams(method, m), compute=COMPUTE[arm])
               for arm, m in copies.items()}
    base = {m: edited_weight(model, m).detach().double().clone() for m in editors[arms[0]].modules}
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    for request in requests:
        for arm in arms:
            record = editors[arm].edit_step([request])
            seconds[arm].append(record.seconds["total"])
    results = [measured(copies[arm], tokenizer, requests, editors[arm], base, seconds[arm], method, arm)
               for arm in arms]
    reference = results[0]
    # Scoring with bf16 products: the float32 arm's edited model, scored again with packed bf16 layers.
    scored = copies[arms[0]]
    with swapped(COMPUTE["bfloat16"].pack(scored, linear_names(scored, [""]), gradients=False)):
        rows = edit_metric_rows(scored, tokenizer, requests, families=("counterfact",))
        bf16_perplexity = wikitext_perplexity(scored, tokenizer)
    bf16_scores = {f"{row.task}/{row.metric}": row.value for row in rows}
    reference["scored_in_bfloat16"] = {
        "perplexity_ratio": bf16_perplexity / reference["perplexity"],
        "max_score_difference": max(abs(bf16_scores[k] - v) for k, v in reference["scores"].items())}
    for result in results[1:]:
        result["against_float32"] = compare(reference, result)
        result["seconds_over_float32"] = result["seconds_per_edit"] / reference["seconds_per_edit"]
    return [{k: v for k, v in r.items() if not k.startswith("_")} for r in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rome,memit")
    parser.add_argument("--arms", default="float32,bfloat16", help="float32 first; of float32, bfloat16, unpacked")
    parser.add_argument("-n", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    arms = args.arms.split(",")
    if arms[0] != "float32":
        raise SystemExit("--arms must start with float32 (the reference)")
    model, tokenizer = load_model("smollm2-135m")
    requests = load_counterfact("edit")[: args.n]
    output = {"threads": args.threads, "n": args.n, "load_average": [os.getloadavg()[0]], "results": []}
    for method in args.methods.split(","):
        for row in run_method(method, arms, model, tokenizer, requests):
            output["results"].append(row)
            print(json.dumps(row), flush=True)
        output["load_average"].append(os.getloadavg()[0])
        if args.json:
            Path(args.json).write_text(json.dumps(output, indent=1))


if __name__ == "__main__":
    main()

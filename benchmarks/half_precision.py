"""Half precision against float32 on the same edits: efficacy, ‖ΔW‖ and evaluation scores.

For each method and each dtype (``float32`` first, as the reference), the default model is loaded in
that dtype and edits the same ``-n`` CounterFact requests sequentially (one per step), from the same
base weights, each dtype with its own statistics (collected through the model in its dtype, summed in
float64) and its own context templates. Reported per method and dtype:

- per request: efficacy after all edits (NLL(target_new) < NLL(target_true), mean per token, in
  float32 log-probabilities whatever the model's dtype) and whether the greedy answer begins with the
  target;
- per edited matrix: ‖W_after − W_base‖_F (the written update, after rounding into the weight's
  dtype) and the relative distance ‖ΔW_half − ΔW_32‖_F / ‖ΔW_32‖_F between the two dtypes' updates;
- the editing metrics (``edit/counterfact``: efficacy, paraphrase, neighbourhood) and the WikiText
  perplexity of the edited model, each dtype against float32.

Half-precision weights round every written update to 8 (bfloat16) or 11 (float16) significant bits;
the numbers this prints are the tolerances the README states and tests/test_half_precision.py uses.

    python benchmarks/half_precision.py --methods rome,memit -n 10 --dtypes float32,bfloat16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.evaluation.edit_metrics import edit_metric_rows
from workers.evaluation.scoring import EncodedPair, encode_pair, score_encoded
from workers.generation import begins_with, greedy_continuations
from workers.models import edited_weight, load_model
from workers.stats import load_corpus


def efficacy(model, tokenizer, requests) -> list[bool]:
    """Per request: mean NLL of target_new below that of target_true on the edit prompt."""
    pairs = [encode_pair(tokenizer, r.prompt, " " + answer.strip())
             for r in requests for answer in (r.target_new, r.target_true)]
    scores = score_encoded(model, tokenizer, pairs)
    nll = [s.mean_nll for s in scores]
    return [nll[2 * i] < nll[2 * i + 1] for i in range(len(requests))]


def wikitext_perplexity(model, tokenizer, data_root=None, windows: int = 8, length: int = 256) -> float:
    """Perplexity over the first ``windows`` windows of WikiText-2 test (float32 log-probabilities)."""
    ids = tokenizer(load_corpus("wikitext-test", data_root))["input_ids"]
    pairs = [EncodedPair(tuple(ids[start:start + 1]), tuple(ids[start + 1:start + length]))
             for start in range(0, windows * length, length)]
    scores = score_encoded(model, tokenizer, pairs)
    return math.exp(sum(-s.total_logprob for s in scores) / sum(len(s.token_ids) for s in scores))


def run_arm(method: str, dtype: str, requests, cache_dir: str | None) -> dict:
    model, tokenizer = load_model("smollm2-135m", dtype=getattr(torch, dtype))
    editor = Editor(model, tokenizer, method, load_hparams(method, model), on_error="skip", cache_dir=cache_dir)
    base = {m: edited_weight(model, m).detach().double().clone() for m in editor.modules}
    start = time.perf_counter()
    records = editor.apply(requests) and editor.records
    seconds = time.perf_counter() - start
    updates = {m: edited_weight(model, m).detach().double() - base[m] for m in editor.modules}
    answers = greedy_continuations(model, tokenizer, [r.prompt for r in requests], max_new_tokens=4)
    rows = edit_metric_rows(model, tokenizer, requests, families=("counterfact",))
    return {
        "method": method, "dtype": dtype, "seconds": seconds,
        "skipped": [r.error for r in records if r.skipped],
        "efficacy": efficacy(model, tokenizer, requests),
        "greedy": [begins_with(a, r.target_new) for a, r in zip(answers, requests)],
        "scores": {f"{row.task}/{row.metric}": row.value for row in rows},
        "perplexity": wikitext_perplexity(model, tokenizer),
        "dw_fro": {m: float(u.norm()) for m, u in updates.items()},
        "_updates": updates,
    }


def compare(reference: dict, arm: dict) -> dict:
    distance = {m: float((arm["_updates"][m] - u).norm() / u.norm()) for m, u in reference["_updates"].items()}
    norm_ratio = {m: arm["dw_fro"][m] / reference["dw_fro"][m] for m in reference["dw_fro"]}
    return {
        "efficacy_equal": arm["efficacy"] == reference["efficacy"],
        "greedy_equal": arm["greedy"] == reference["greedy"],
        "max_relative_dw_distance": max(distance.values()),
        "max_abs_log_norm_ratio": max(abs(math.log(r)) for r in norm_ratio.values()),
        "max_score_difference": max(abs(arm["scores"][k] - v) for k, v in reference["scores"].items()),
        "perplexity_ratio": arm["perplexity"] / reference["perplexity"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="rome,memit,alphaedit,rome-eac,memit-eac,alphaedit-eac,"
                                              "rome-prune,memit-prune,alphaedit-prune,rome-rect,memit-rect,alphaedit-rect")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("-n", type=int, default=10)
    parser.add_argument("--cache-dir", default=None, help="statistics/templates cache shared by the arms")
    parser.add_argument("--json", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the numbers the README gives)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    requests = load_counterfact("edit")[: args.n]
    dtypes = args.dtypes.split(",")
    if dtypes[0] != "float32":
        raise SystemExit("--dtypes must start with float32 (the reference)")
    results = []
    for method in args.methods.split(","):
        arms = [run_arm(method, dtype, requests, args.cache_dir) for dtype in dtypes]
        for arm in arms:
            row = {k: v for k, v in arm.items() if not k.startswith("_")}
            if arm is not arms[0]:
                row["against_float32"] = compare(arms[0], arm)
            results.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()

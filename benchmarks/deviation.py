"""How far sequential edits drag the edited matrices: relative L1 norm after 10, 25 and 50 edits.

The paper's finding (Fig. 2): under ROME the edited matrix's L1 norm grows by hundreds of percent over
many sequential edits; EAC keeps it far lower. Here: the default model, ``-n`` sequential CounterFact
edits (validation split), for each method; relative L1 = ‖W‖₁ / ‖W₀‖₁ of the most-changed edited
matrix, plus how many edits were skipped.

    python benchmarks/deviation.py --methods rome,rome-eac,memit,memit-eac -n 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.generation import begins_with, greedy_continuations
from workers.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--methods", default="rome,rome-eac,memit,memit-eac")
    parser.add_argument("-n", type=int, default=50)
    parser.add_argument("--checkpoints", default="10,25,50")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    checkpoints = sorted(int(c) for c in args.checkpoints.split(",") if int(c) <= args.n)
    model, tokenizer = load_model(args.model)
    requests = load_counterfact("val")[: args.n]
    rows = []
    for method in args.methods.split(","):
        editor = Editor(model, tokenizer, method, load_hparams(method, model))
        start = time.perf_counter()
        for index, request in enumerate(requests, start=1):
            record = editor.edit_step([request])
            if index in checkpoints:
                worst = max(record.relative_l1.values())
                skipped = sum(r.skipped for r in editor.records)
                # A smaller norm only means something if the facts are still written: the share of
                # the edits so far whose prompt's greedy continuation begins with the new target.
                answers = greedy_continuations(model, tokenizer, [r.prompt for r in requests[:index]],
                                               max_new_tokens=6)
                efficacy = sum(begins_with(a, r.target_new) for a, r in zip(answers, requests)) / index
                rows.append({"method": method, "n_edits": index, "relative_l1": worst,
                             "relative_l1_per_matrix": record.relative_l1, "skipped": skipped,
                             "efficacy_so_far": efficacy})
                print(f"{method:12s} after {index:3d} edits: relative L1 {worst:.4f} "
                      f"({(worst - 1) * 100:+.2f}%), efficacy of edits so far {efficacy:.2f}, skipped {skipped}, "
                      f"{time.perf_counter() - start:.0f} s", flush=True)
        editor.revert()
    print(f"\n{'method':12s} " + " ".join(f"{c:>10d}" for c in checkpoints))
    for method in args.methods.split(","):
        values = {r["n_edits"]: r["relative_l1"] for r in rows if r["method"] == method}
        print(f"{method:12s} " + " ".join(f"{(values[c] - 1) * 100:+9.2f}%" for c in checkpoints))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump([{k: r[k] for k in ("method", "n_edits", "relative_l1", "efficacy_so_far", "skipped")}
                       for r in rows], handle, indent=1)


if __name__ == "__main__":
    main()

"""A long sequential MEMIT trajectory: does an edit cost the same at edit 1,000 as at edit 1?

Runs ``--tiny-edits`` (1,000) sequential single-fact MEMIT edits on tiny-llama and ``--default-edits``
(200) on the default model (``--part`` picks which), one CounterFact request per edit (cycled when
the split is shorter). Every 50th edit it prints the mean seconds per edit of the last 50 and the
process's resident memory. At the end it reports whether both stay flat — the mean over the last 10%
of edits within 10% of the mean over the first 10% (seconds per edit; resident memory at those
checkpoints) — and whether the edit log, saved to a file and loaded back, replays onto the base
weights to exactly the edited weights (bit for bit).

    python benchmarks/long_trajectory.py --part tiny
    python benchmarks/long_trajectory.py --part default --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.editing.delta import EditLog, edited_weight
from workers.memory import resident_mib
from workers.models import DEFAULT_MODEL, load_model

CHECKPOINT_EVERY = 50
FLAT = 0.10  # last 10% within 10% of the first 10%


def within(first: float, last: float) -> bool:
    return abs(last - first) <= FLAT * first


def trajectory(model_name: str, n_edits: int, method: str = "memit") -> dict:
    model, tokenizer = load_model(model_name)
    editor = Editor(model, tokenizer, method, load_hparams(method, model))
    pool = load_counterfact("edit")
    seconds, memory = [], []
    start_all = time.perf_counter()
    for i in range(n_edits):
        record = editor.edit_step([pool[i % len(pool)]])
        seconds.append(record.seconds["total"])
        if (i + 1) % CHECKPOINT_EVERY == 0 or i + 1 == n_edits:
            memory.append((i + 1, resident_mib()))
            recent = seconds[-CHECKPOINT_EVERY:]
            print(f"{model_name} edit {i + 1:5d}: {statistics.mean(recent):.3f} s/edit over the last {len(recent)}, "
                  f"resident {memory[-1][1]:.0f} MiB, skipped so far {sum(r.skipped for r in editor.records)}",
                  flush=True)
    wall = time.perf_counter() - start_all
    tenth = max(1, n_edits // 10)
    first_s, last_s = statistics.mean(seconds[:tenth]), statistics.mean(seconds[-tenth:])
    early = [mib for edit, mib in memory if edit <= max(tenth, CHECKPOINT_EVERY)]
    late = [mib for edit, mib in memory if edit > n_edits - max(tenth, CHECKPOINT_EVERY)]
    first_m, last_m = statistics.mean(early), statistics.mean(late)

    edited = {m: edited_weight(model, m).detach().clone() for m in editor.log.modules()}
    with tempfile.TemporaryDirectory() as tmp:
        path = editor.log.save(Path(tmp) / "log.safetensors")
        loaded = EditLog.load(path)
    editor.revert()
    loaded.replay(model)
    replay_exact = all(torch.equal(edited_weight(model, m), w) for m, w in edited.items())
    return {"model": model_name, "edits": n_edits, "wall_seconds": wall, "first_s": first_s, "last_s": last_s,
            "seconds_flat": within(first_s, last_s), "first_mib": first_m, "last_mib": last_m,
            "memory_flat": within(first_m, last_m), "replay_exact": replay_exact,
            "skipped": sum(r.skipped for r in editor.records) if editor.records else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("tiny", "default", "both"), default="both")
    parser.add_argument("--tiny-edits", type=int, default=1000)
    parser.add_argument("--default-edits", type=int, default=200)
    parser.add_argument("--method", default="memit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = []
    if args.part in ("tiny", "both"):
        runs.append(("tiny-llama", args.tiny_edits))
    if args.part in ("default", "both"):
        runs.append((DEFAULT_MODEL, args.default_edits))
    for name, n in runs:
        if n < 10:
            parser.error(f"at least 10 edits are needed to compare the first and last 10%, got {n}")
        row = trajectory(name, n, args.method)
        print(f"{name}: {n} edits in {row['wall_seconds']:.0f} s; s/edit first 10% {row['first_s']:.3f}, "
              f"last 10% {row['last_s']:.3f} -> {'flat' if row['seconds_flat'] else 'NOT flat'}; resident MiB "
              f"{row['first_mib']:.0f} -> {row['last_mib']:.0f} -> {'flat' if row['memory_flat'] else 'NOT flat'}; "
              f"saved log replays to the edited weights: {'exactly' if row['replay_exact'] else 'NO'}; "
              f"skipped edits {row['skipped']}", flush=True)


if __name__ == "__main__":
    main()

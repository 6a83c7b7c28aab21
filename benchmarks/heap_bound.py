"""What ``workers.memory.release_free_heap`` (glibc's ``malloc_trim(0)`` after every edit step) costs and
saves over a sequence of edits, against glibc's default and against fixing its mmap threshold, in one
interleaved run.

One worker process per arm loads the default model and edits the same ``-n`` CounterFact requests in
sequence: ``trim`` as the toolkit runs (the Editor releases the free heap after each step), ``dynamic``
with glibc's default (the Editor's release replaced by a no-op), and one arm per ``--thresholds`` value in
MiB (no release; the mmap threshold fixed with ``mallopt``, the alternative remedy). The parent hands them
the requests one at a time, rotating which goes first, so a change in the machine's load falls on all
alike. Per arm: CPU seconds per edit (median, first edit left out: it includes set-up) and the median of
the per-edit ratios to ``dynamic`` (the same request back to back), the resident set after each edit and
its growth per edit (least squares over the edits after the first three), and whether the arms' edits are
bit-identical (the memory policy must not change a number).

    python benchmarks/heap_bound.py --method alphaedit -n 16 --thresholds 16 --json benchmarks/results/heap_bound-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORKER = """
import ctypes, ctypes.util, json, sys, time, torch
torch.set_num_threads(1)
from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
import workers.editing.editor as editor_module
from workers.memory import resident_mib
from workers.models import load_model
arm, method, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if arm != "trim":
    editor_module.release_free_heap = lambda: False
if arm.endswith("MiB"):  # M_MMAP_THRESHOLD = -3 (glibc's malloc.h)
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, int(arm.removesuffix("MiB")) << 20)
model, tokenizer = load_model("smollm2-135m")
editor = Editor(model, tokenizer, method, load_hparams(method, model))
requests = load_counterfact("edit")[:n]
print(json.dumps({"ready": resident_mib()}), flush=True)
for line in sys.stdin:
    i = int(line)
    start = time.process_time()
    record = editor.edit_step([requests[i]])
    print(json.dumps({"cpu_s": time.process_time() - start, "rss_mib": resident_mib(), "dw_fro": record.dw_fro,
                      "dw_l1": record.dw_l1}), flush=True)
"""


def slope(values: list[float]) -> float:
    """Least-squares growth per step (NaN with fewer than two values)."""
    if len(values) < 2:
        return float("nan")
    return statistics.linear_regression(range(len(values)), values).slope


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="alphaedit")
    parser.add_argument("-n", type=int, default=24)
    parser.add_argument("--thresholds", default="", help="fixed mmap thresholds in MiB to compare, comma-separated")
    parser.add_argument("--json")
    args = parser.parse_args()
    arms = ["trim"] + [f"{int(t)}MiB" for t in args.thresholds.split(",") if t] + ["dynamic"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    workers = {arm: subprocess.Popen([sys.executable, "-c", WORKER, arm, args.method, str(args.n)], cwd=ROOT,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for arm in arms}
    ready = {arm: json.loads(w.stdout.readline())["ready"] for arm, w in workers.items()}
    steps: dict[str, list[dict]] = {arm: [] for arm in arms}
    started = time.time()
    for i in range(args.n):
        for arm in arms[i % len(arms):] + arms[:i % len(arms)]:
            workers[arm].stdin.write(f"{i}\n")
            workers[arm].stdin.flush()
            steps[arm].append(json.loads(workers[arm].stdout.readline()))
        print(f"edit {i + 1}/{args.n}: " + ", ".join(f"{arm} {steps[arm][-1]['cpu_s']:.2f} s "
                                                      f"{steps[arm][-1]['rss_mib']:.0f} MiB" for arm in arms),
              flush=True)
    for w in workers.values():
        w.stdin.close()
        w.wait()
    result = {"method": args.method, "n": args.n, "load_average": os.getloadavg(), "wall_s": time.time() - started,
              "identical_edits": all(len({(s["dw_fro"], s["dw_l1"]) for s in same}) == 1
                                     for same in zip(*steps.values())), "arms": {}}
    for arm in arms:
        rss = [s["rss_mib"] for s in steps[arm]]
        result["arms"][arm] = {"cpu_s_per_edit": statistics.median(s["cpu_s"] for s in steps[arm][1:]),
                               "rss_ready_mib": ready[arm], "rss_last_mib": rss[-1],
                               "rss_growth_mib_per_edit": slope(rss[3:] if len(rss) >= 6 else rss), "rss_mib": rss}
    dynamic = result["arms"]["dynamic"]["cpu_s_per_edit"]
    for arm in arms:
        a = result["arms"][arm]
        a["cpu_over_dynamic"] = a["cpu_s_per_edit"] / dynamic
        # Paired per edit (the same request, back to back): the median of the per-edit ratios.
        a["cpu_over_dynamic_paired"] = statistics.median(
            s["cpu_s"] / d["cpu_s"] for s, d in zip(steps[arm][1:], steps["dynamic"][1:]))
        a["cpu_s"] = [s["cpu_s"] for s in steps[arm]]
        print(f"{arm:8s} CPU {a['cpu_s_per_edit']:.2f} s/edit ({a['cpu_over_dynamic']:.3f} of dynamic; paired per "
              f"edit {a['cpu_over_dynamic_paired']:.3f}), resident "
              f"{a['rss_ready_mib']:.0f} -> {a['rss_last_mib']:.0f} MiB, growth {a['rss_growth_mib_per_edit']:+.1f} MiB/edit")
    print(f"edits bit-identical across arms: {result['identical_edits']}; load average {result['load_average']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

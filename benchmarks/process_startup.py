"""What a fresh process pays before its first edit — every Ray actor, every `eac` subprocess — with the
environment's compiled bytecode against without it, in one run.

uv installs packages without .pyc files, and where PYTHONDONTWRITEBYTECODE is set none are ever written,
so each process compiles transformers, Ray and the rest from source as it imports them. `make setup`
installs with ``--compile-bytecode``; this measures what that buys. The "uncompiled" arm points
PYTHONPYCACHEPREFIX at a directory holding the bytecode of torch only (pip, which installs torch,
compiles it; uv, which installs the rest, did not) with writing off: the state of the environment
before the flag. Arms alternate process by process so that a change of load falls on both.

    python benchmarks/process_startup.py -n 4
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

# A trajectory actor's start-up on the tiny model: the imports, the model, the editor (statistics and
# templates from a warm cache), one edit.
CHILD = """
import time
start = time.monotonic()
import workers.actors
from workers.data import load_counterfact
from workers.editing import Editor, load_hparams
from workers.models import load_model
model, tokenizer = load_model("tiny-gpt2")
editor = Editor(model, tokenizer, "rome", load_hparams("rome", "tiny-gpt2"), cache_dir={cache!r})
editor.edit_step(load_counterfact("edit")[:1])
print(time.monotonic() - start)
"""


def run_child(cache: str, pycache_prefix: str | None) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPYCACHEPREFIX", None)
    if pycache_prefix:
        env["PYTHONPYCACHEPREFIX"] = pycache_prefix
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", CHILD.format(cache=cache)], env=env, check=True,
                         capture_output=True, text=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": time.monotonic() - started, "inside": float(out.strip().splitlines()[-1]),
            "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=4, help="processes per arm")
    parser.add_argument("--json", help="write the measurements here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as torch_only:
        import torch

        # torch's bytecode alone, in the prefix tree (compileall honours PYTHONPYCACHEPREFIX). Not checked:
        # torch ships a few files that do not compile on this Python (pip skips them too).
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", os.path.dirname(torch.__file__)],
                       env=dict(os.environ, PYTHONPYCACHEPREFIX=torch_only), stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        run_child(cache, None)  # warms the editor's cache (statistics, templates) and the page cache
        arms = {"compiled": [], "uncompiled": []}
        for _ in range(args.n):
            arms["compiled"].append(run_child(cache, None))
            arms["uncompiled"].append(run_child(cache, torch_only))
    mean = {arm: {key: sum(r[key] for r in rows) / len(rows) for key in ("cpu", "wall", "inside")}
            for arm, rows in arms.items()}
    for arm, values in mean.items():
        print(f"{arm:10s} CPU {values['cpu']:6.2f} s  wall {values['wall']:6.2f} s  (imports to first edit "
              f"{values['inside']:6.2f} s)")
    print(f"compiled / uncompiled: CPU {mean['compiled']['cpu'] / mean['uncompiled']['cpu']:.2f}, "
          f"wall {mean['compiled']['wall'] / mean['uncompiled']['wall']:.2f}  (n = {args.n} each, alternating)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "mean": mean, "runs": arms}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

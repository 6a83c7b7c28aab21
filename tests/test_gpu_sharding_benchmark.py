"""benchmarks/gpu_sharding.py in its CPU mode (``--tiny``): one ROME edit, then greedy generation
unsharded and over two gloo ranks (PyTorch tensor parallelism, the CPU stand-in for DeepSpeed); the
two must generate the same tokens (float32). Speeds are printed, not asserted."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sharding.py"


def test_the_tiny_mode_edits_then_compares_unsharded_and_sharded_generation(tmp_path):
    out = tmp_path / "result.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "-n", "4", "--batch-size", "2", "--tokens", "5",
                           "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert (result["ranks"], result["sharding"], result["device"]) == (2, "torch", "CPU (--tiny)")
    assert result["identical_generations"] == "4/4"
    assert result["rome_edit_seconds"] > 0
    assert result["unsharded_examples_per_s"] > 0 and result["sharded_examples_per_s"] > 0
    assert "examples/s" in done.stdout and "sharded" in done.stdout

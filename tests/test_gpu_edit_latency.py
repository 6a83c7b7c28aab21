"""benchmarks/gpu_edit_latency.py runs end to end in its CPU mode (tiny shapes), every method."""

from conftest import load_benchmark
from workers.editing import load_hparams


def test_tiny_mode_times_every_method_on_both_architectures():
    script = load_benchmark("gpu_edit_latency")
    rows = script.main(["--tiny"])
    methods = ("rome", "rome-eac", "memit", "memit-eac")
    assert [(r["model"], r["method"]) for r in rows] == [(m, x) for m in ("tiny-llama", "tiny-gpt2") for x in methods]
    for row in rows:
        assert row["seconds_per_edit"] > 0
        # Timing edits never stop early: at least the base method's full step count.
        assert row["steps"] >= load_hparams(row["method"], "tiny-llama").num_steps

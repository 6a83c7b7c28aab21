"""A long editing process's heap stays flat (``workers.memory``): the allocation pattern of an AlphaEdit
step — a fresh float64 d × d running sum per edit, the old one freed, between megabyte-sized tensors —
fragments glibc's heap under its default dynamic mmap threshold (a 300-edit AlphaEdit trajectory
actor grew to 14.8 GB); building an Editor fixes the threshold for the process."""

import subprocess
import sys
import textwrap

import pytest

PATTERN = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    if sys.argv[1] == "editor":
        from workers.editing import Editor, load_hparams
        from workers.models import load_model
        model, tokenizer = load_model("tiny-llama")
        Editor(model, tokenizer, "memit", load_hparams("memit", model), cache_dir=sys.argv[2],
               second_moments={layer: torch.eye(model.config.intermediate_size)
                               for layer in load_hparams("memit", model).layers})

    def rss_mib():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    d = 1536  # the default model's d_in
    running = torch.zeros(d, d, dtype=torch.float64)
    projector = torch.eye(d, dtype=torch.float64)
    kept = []
    for step in range(60):
        key = torch.randn(d, 1, dtype=torch.float64)
        running = running + (projector @ key) @ key.T   # replaced, not changed in place
        copies = [torch.randn(576, d, dtype=torch.float64) for _ in range(3)]
        kept.append(torch.randn(d, 1))
        activations = [torch.randn(300, 576) for _ in range(20)]
        del copies, activations
        if step == 10:
            start = rss_mib()
    print(round(rss_mib() - start))
""")


def growth_mib(mode: str, tmp_path) -> int:
    result = subprocess.run([sys.executable, "-c", PATTERN, mode, str(tmp_path)], capture_output=True, text=True,
                            timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
                                              "HF_HUB_OFFLINE": "1", "PYTHONPATH": ":".join(sys.path)})
    assert result.returncode == 0, result.stderr[-2000:]
    return int(result.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's heap; /proc/self/statm")
def test_building_an_editor_keeps_the_heap_flat_under_alphaedits_allocation_pattern(tmp_path):
    plain = growth_mib("plain", tmp_path)
    if plain < 100:
        pytest.skip(f"this C library does not fragment on the pattern (+{plain} MiB over 50 steps)")
    assert growth_mib("editor", tmp_path) < 30, f"the heap grew as without the bound (+{plain} MiB)"

"""Shared fixtures. The default model is loaded once per session (it loads in < 1 s, but edits and
evaluations share it); tests that change its weights must restore them (see ``restored_weights``)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from workers import settings

torch.set_num_threads(2)
# Tests never reach a hub: a missing file must fail at once, not after network retries.
os.environ.setdefault("EAC_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def data_root():
    root = settings.data_dir()
    if not (root / "counterfact").is_dir():
        pytest.fail(f"data directory {root} has no counterfact/; set EAC_DATA_DIR (make test does)")
    return root


@pytest.fixture(scope="session")
def default_model():
    from workers.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture
def tiny_gpt2():
    from workers.models import load_model

    return load_model("tiny-gpt2")


@pytest.fixture
def tiny_llama():
    from workers.models import load_model

    return load_model("tiny-llama")


@contextlib.contextmanager
def restored_weights(model):
    """Run a block that edits ``model`` and put every parameter back afterwards, bit for bit."""
    saved = {name: p.detach().clone() for name, p in model.named_parameters()}
    try:
        yield model
    finally:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(saved[name])


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) as a module, registered under its name so that its
    dataclasses can find their module."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

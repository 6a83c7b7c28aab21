"""The two ways the project reaches inside a model; every change is undone on exit.

Forward hooks, when every module still runs:
- ``Trace`` records the input and/or output of named modules during a forward pass and can stop the
  pass right after the last module it needs (so statistics for layers 4-8 never run layers 9-29);
- ``patch_output`` replaces a module's output by a function of it (and, if asked, of its input):
  FT adds D k to the projection's output; ``add_to_output`` (a benchmark aid) adds δ at given token positions.
Module replacement, when modules must not run at all (a hook cannot skip its module):
- ``modules_replaced`` swaps named submodules for others within a block (the target optimiser
  replaces the layers below the edited one by a replay of their cached output, prefix.py).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch


class StopForward(Exception):
    """Raised by a hook to end a forward pass early; ``Trace`` swallows it."""


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"module produced {type(value).__name__}, expected a tensor or a tuple starting with one")


class Trace:
    """``with Trace(model, names, inputs=True) as trace: model(**batch)`` then ``trace.inputs[name]``.

    ``stop_after``: name of a module after which the forward pass is abandoned (its hook raises
    ``StopForward``, which the context manager suppresses). ``detach``: store detached tensors.
    """

    def __init__(self, model, names: Iterable[str], *, inputs: bool = False, outputs: bool = True,
                 stop_after: str | None = None, detach: bool = True):
        self.model = model
        self.names = list(names)
        self.want_inputs, self.want_outputs = inputs, outputs
        self.stop_after, self.detach = stop_after, detach
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self.tuple_outputs: dict[str, bool] = {}  # whether the module returned a tuple, not a tensor
        self._handles = []

    def _hook(self, name: str):
        def hook(module, args, output):
            if self.want_inputs:
                value = _first_tensor(args)
                self.inputs[name] = value.detach() if self.detach else value
            if self.want_outputs:
                self.tuple_outputs[name] = not isinstance(output, torch.Tensor)
                value = _first_tensor(output)
                self.outputs[name] = value.detach() if self.detach else value
            if name == self.stop_after:
                raise StopForward
        return hook

    def __enter__(self) -> "Trace":
        names = set(self.names) | ({self.stop_after} if self.stop_after else set())
        for name in names:
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return exc_type is StopForward


@contextmanager
def patch_output(model, name: str, edit: Callable[..., torch.Tensor], *, with_input: bool = False):
    """Replace module ``name``'s output (or its first element, for tuple outputs) by ``edit(output)``,
    or by ``edit(output, input)`` with ``with_input`` (the module's first positional input)."""

    def hook(module, args, output):
        first = _first_tensor(output)
        edited = edit(first, _first_tensor(args)) if with_input else edit(first)
        return edited if isinstance(output, torch.Tensor) else (edited, *output[1:])

    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def add_to_output(model, name: str, vector: torch.Tensor, rows: Sequence[int], positions: Sequence[int]):
    """Add ``vector`` to module ``name``'s output at (row, position) pairs — out of place, so the
    gradient flows to ``vector``. Returns a context manager. A benchmark aid: the naive δ injection
    (a full forward per step) that benchmarks/edit_latency.py times the shared optimiser against;
    the editing code itself injects δ through targets.py's cached runs (prefix.py)."""
    rows_t = torch.as_tensor(list(rows), dtype=torch.long)
    positions_t = torch.as_tensor(list(positions), dtype=torch.long)

    def edit(output: torch.Tensor) -> torch.Tensor:
        index_rows, index_pos = rows_t.to(output.device), positions_t.to(output.device)
        update = torch.zeros_like(output)
        update = update.index_put((index_rows, index_pos), vector.to(output.dtype).expand(len(rows_t), -1))
        return output + update

    return patch_output(model, name, edit)


@contextmanager
def modules_replaced(model, replacements: dict[str, torch.nn.Module]):
    """Within the block, each named submodule of ``model`` is ``replacements[name]``; the original
    modules are put back on exit, whatever happens."""
    originals: dict[str, torch.nn.Module] = {}
    try:
        for name, module in replacements.items():
            parent, _, child = name.rpartition(".")
            originals[name] = model.get_submodule(name)
            setattr(model.get_submodule(parent), child, module)
        yield
    finally:
        for name, module in originals.items():
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)

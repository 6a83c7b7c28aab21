"""Linear layers on oneDNN with their weights packed once, for passes that run the same frozen weights
many times (the target optimisation's steps, a checkpoint's scoring batches).

Why: on this project's CPU (AMD EPYC, AVX-512) PyTorch's float32 ``linear``/``mm`` goes to MKL, which
runs its AVX2 kernels on non-Intel CPUs, and repacks the weight at every call; oneDNN with the weight
reordered once into its blocked layout runs the model's shapes 1.5–3.0× faster on one thread
(``benchmarks/packed_linear.py``). The result is the same product in float32 with another summation
order: equal to the plain path within float32 round-off, not bit for bit.

``PackedLinears(model, names)`` packs the named ``nn.Linear`` (and GPT-2 ``Conv1D``) modules;
``with packed.swapped():`` runs the model with them replaced (hooks.modules_replaced: put back on exit).
The weights must not change while a ``PackedLinears`` is used (it packs a copy): the target
optimisation builds one per problem, after the edits it depends on, and the evaluator one per
checkpoint. Gradients flow to the input only (the model's weights are frozen: ``requires_grad`` is
refused). Where oneDNN cannot run (not a CPU tensor, a dtype other than float32/bfloat16, PyTorch
without mkldnn) ``available`` is False and ``swapped`` changes nothing.

``compute_dtype`` (default: the weight's own) packs the weights in that dtype and casts the input to
it and the output back: with ``torch.bfloat16`` the matrix products run in bf16 (AVX512-BF16) while
everything else (norms, softmax, attention, the optimised δ) stays in the model's dtype.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from workers.hooks import modules_replaced

try:  # transformers' GPT-2 linear layer (y = x W + b, W stored in × out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency
    Conv1D = ()

PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def onednn_available(weight: torch.Tensor, compute_dtype: torch.dtype | None = None) -> bool:
    """Whether oneDNN can run products with ``weight`` (in ``compute_dtype``) here."""
    dtype = compute_dtype or weight.dtype
    return (weight.device.type == "cpu" and weight.dtype in PACKABLE_DTYPES and dtype in PACKABLE_DTYPES
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _pack(weight: torch.Tensor, rows_hint: int) -> torch.Tensor:
    """(out, in) weight -> oneDNN's blocked layout for y = x Wᵀ."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class _PackedProduct(torch.autograd.Function):
    """y = x Wᵀ + b with W packed twice: as W (forward) and as Wᵀ (∂L/∂x = ∂L/∂y · W)."""

    @staticmethod
    def forward(ctx, x, packed, packed_transposed, bias):
        ctx.packed_transposed = packed_transposed
        return _product(x, packed, bias)

    @staticmethod
    def backward(ctx, grad):
        return _product(grad.contiguous(), ctx.packed_transposed, None), None, None, None


class PackedLinear(torch.nn.Module):
    """Stands in for one linear layer: the same y = x Wᵀ + b on oneDNN with W packed once."""

    def __init__(self, module: torch.nn.Module, compute_dtype: torch.dtype | None = None, rows_hint: int = 64,
                 gradients: bool = True):
        super().__init__()
        if isinstance(module, torch.nn.Linear):
            weight = module.weight  # (out, in)
        elif Conv1D and isinstance(module, Conv1D):
            weight = module.weight.t()  # Conv1D stores (in, out)
        else:
            raise TypeError(f"cannot pack {type(module).__name__}: only nn.Linear and Conv1D")
        if weight.requires_grad:
            raise ValueError("PackedLinear computes no weight gradient: the model's weights must be frozen")
        self.dtype = weight.dtype
        self.compute_dtype = compute_dtype or weight.dtype
        weight = weight.detach().to(self.compute_dtype)
        self.packed = _pack(weight, rows_hint)
        # Wᵀ packed only where a gradient will flow back through the layer (a second copy of the weights).
        self.packed_transposed = _pack(weight.t(), rows_hint) if gradients else None
        bias = getattr(module, "bias", None)
        self.bias = None if bias is None else bias.detach().to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype).contiguous()
        if x.requires_grad and torch.is_grad_enabled():
            if self.packed_transposed is None:
                raise RuntimeError("this PackedLinear was packed without gradients (gradients=False)")
            y = _PackedProduct.apply(x, self.packed, self.packed_transposed, self.bias)
        else:
            y = _product(x, self.packed, self.bias)
        return y.to(self.dtype)


class PackedLinears:
    """The named linear modules of ``model``, packed once; ``swapped()`` runs the model with them."""

    def __init__(self, model, names, compute_dtype: torch.dtype | None = None, rows_hint: int = 64,
                 gradients: bool = True):
        modules = {name: model.get_submodule(name) for name in names}
        self.model = model
        self.available = all(onednn_available(m.weight, compute_dtype) for m in modules.values())
        self.replacements = ({name: PackedLinear(m, compute_dtype, rows_hint, gradients) for name, m in modules.items()}
                             if self.available else {})

    def swapped(self):
        return modules_replaced(self.model, self.replacements) if self.replacements else contextlib.nullcontext()


def linear_names(model, under: list[str]) -> list[str]:
    """Names of the linear layers (nn.Linear, Conv1D) inside the named submodules of ``model``."""
    kinds = (torch.nn.Linear,) + ((Conv1D,) if Conv1D else ())
    names = []
    for prefix in under:  # "" is the whole model
        module = model.get_submodule(prefix)
        if isinstance(module, kinds):
            names.append(prefix)
            continue
        names += [f"{prefix}.{name}".lstrip(".") for name, child in module.named_modules()
                  if name and isinstance(child, kinds)]
    return names


@dataclass(frozen=True)
class LinearCompute:
    """How a pass that reruns frozen weights computes its linear layers: ``packed`` (oneDNN, packed
    once; False: PyTorch's own ``linear``) and ``dtype`` (None: the weights' own; ``bfloat16``: the
    products in bf16, the rest in the model's dtype — needs ``packed``)."""

    packed: bool = True
    dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.dtype is not None and not self.packed:
            raise ValueError("a compute dtype needs packed linear layers (packed: true)")
        if self.dtype not in (None, *PACKABLE_DTYPES):
            raise ValueError(f"compute dtype must be float32 or bfloat16, got {self.dtype}")

    def pack(self, model, names, gradients: bool = True) -> PackedLinears | None:
        """The named layers packed (None: not packed, or oneDNN cannot run them here); ``gradients``:
        whether gradients will flow back through them."""
        if not self.packed:
            return None
        packed = PackedLinears(model, names, self.dtype, gradients=gradients)
        return packed if packed.available else None


def weight_versions(model, names) -> tuple:
    """What identifies the named layers' current weights: each weight's storage and its in-place version
    counter (PyTorch bumps it at every in-place write through the tensor or a view of it: an edit, a
    revert, a replayed log)."""
    return tuple((w.data_ptr(), w._version) for w in (model.get_submodule(name).weight for name in names))


class PackCache:
    """``LinearCompute.pack`` that keeps what it packed and hands it out again while the packed layers'
    weights are unchanged. The target optimisation packs the layers above the edited one and the LM
    head, which an editing trajectory never writes: packed once per Editor instead of once per edit
    step (~0.7 CPU-s a step on the default model, against ~5 CPU-s for a MEMIT edit). Keyed on the
    layers' names, ``gradients`` and ``weight_versions``; holds one packing per key (for the default
    model's upper layers, W and Wᵀ: ~1.1 GB while the Editor lives)."""

    def __init__(self, compute: LinearCompute):
        self.compute = compute
        self._kept: dict[tuple, tuple[tuple, PackedLinears | None]] = {}

    def pack(self, model, names, gradients: bool = True) -> PackedLinears | None:
        names = tuple(names)
        key, versions = (names, gradients), weight_versions(model, names)
        kept = self._kept.get(key)
        if kept is None or kept[0] != versions:
            self._kept[key] = kept = (versions, self.compute.pack(model, names, gradients))
        return kept[1]


def swapped(packed: PackedLinears | None):
    """``packed.swapped()``, or nothing to do for None."""
    return packed.swapped() if packed is not None else contextlib.nullcontext()

"""Locate-then-edit methods (ROME, MEMIT, AlphaEdit), constrained fine-tuning, and EAC around them."""

from workers.editing.delta import EditLog, LayerDelta, WeightDelta, applied
from workers.editing.editor import Editor
from workers.editing.record import EditRecord
from workers.editing.methods import METHODS, load_hparams

__all__ = ["EditLog", "EditRecord", "Editor", "LayerDelta", "METHODS", "WeightDelta", "applied", "load_hparams"]

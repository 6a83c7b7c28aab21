"""The method registry drives the Editor: a base method's record alone decides its layers, its step,
whether statistics are prepared and what resuming a log rebuilds."""

import dataclasses

import torch

from workers.data import EditRequest
from workers.editing import Editor, load_hparams, methods
from workers.editing.record import StepInfo
from workers.editing.delta import LayerDelta, WeightDelta
from workers.models import arch_spec, edited_weight, load_model

REQUEST = EditRequest(0, "The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "English", "French")


def test_an_entry_of_the_registry_is_all_the_editor_reads(tmp_path, monkeypatch):
    model, tokenizer = load_model("tiny-gpt2")
    hp = dataclasses.replace(load_hparams("ft-m", model), layer=1)
    calls = {"steps": [], "resumed": []}

    def step(model, tokenizer, requests, hparams, ctx, method):
        module = arch_spec(model).mlp_out_name(hparams.layer)
        layer_delta = LayerDelta(module, torch.full_like(edited_weight(model, module), 1e-3))
        layer_delta.apply(model)
        calls["steps"].append(method)
        return WeightDelta([layer_delta], [r.case_id for r in requests], method), StepInfo(loss=0.5, steps=1)

    def second_layer_too(hparams):
        return [hparams.layer, hparams.layer + 1]

    entry = methods.Method(type(hp), second_layer_too, step, methods.never, context_templates=False,
                           on_resume=lambda ctx, delta: calls["resumed"].append(list(delta.case_ids)))
    monkeypatch.setitem(methods.BASES, "ft-m", entry)
    editor = Editor(model, tokenizer, "ft-m", hp, cache_dir=tmp_path)
    spec = arch_spec(model)
    assert editor.modules == [spec.mlp_out_name(1), spec.mlp_out_name(2)]
    record = editor.edit_step([REQUEST])
    assert calls["steps"] == ["ft-m"] and not record.skipped and record.loss == 0.5
    log = editor.log
    editor.resume(log)
    assert calls["resumed"] == [[0]]

"""One check shared by the editing tests: an edit log saved, the model reverted, the log replayed."""

import torch

from workers.editing import EditLog


def assert_revert_and_replay_are_bit_exact(model, editor, log, base: dict, tmp_path) -> None:
    """The edits changed the model; revert gives ``base`` bit for bit; replaying the saved log gives
    the edited weights bit for bit."""
    edited = {name: p.detach().clone() for name, p in model.named_parameters()}
    assert any(not torch.equal(edited[n], base[n]) for n in base)
    path = log.save(tmp_path / "log.safetensors")
    editor.revert()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters())
    EditLog.load(path).replay(model)
    assert all(torch.equal(p, edited[n]) for n, p in model.named_parameters())

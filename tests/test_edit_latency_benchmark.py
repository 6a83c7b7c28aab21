"""benchmarks/edit_latency.py interleaves the arms of one base method, each on its own model copy."""

import torch

from conftest import load_benchmark
from workers.data import load_counterfact


def test_arms_edit_the_same_requests_on_their_own_copies(tiny_llama, data_root):
    script = load_benchmark("edit_latency")
    model, tokenizer = tiny_llama
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    requests = load_counterfact("edit")[:2]
    rows = script.measure_group(model, tokenizer, ["rome", "rome-eac"], requests, 1)
    # The arms edited copies: the model handed in is untouched (shared weights would mix the trajectories).
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    rome, eac = rows
    assert rome["case_ids"] == eac["case_ids"] == [requests[1].case_id]  # the warm-up is not counted
    assert {"old_seconds_per_edit", "new_over_old"} <= set(rome)  # both paths of the target optimiser
    assert eac["eac_over_base"] == eac["seconds_per_edit"] / rome["seconds_per_edit"] and rome["eac_over_base"] is None


def test_methods_are_grouped_by_base_in_the_order_given():
    script = load_benchmark("edit_latency")
    assert script.groups_of(["rome-eac", "memit", "rome", "memit-rect", "ft-l"]) == [
        ["rome-eac", "rome"], ["memit", "memit-rect"], ["ft-l"]]

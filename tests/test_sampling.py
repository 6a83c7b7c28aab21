"""One seeded sampler for every choice of records, drawing exactly what the three samplers it
replaced drew (requests: ``random.Random(seed).sample``; examples and perplexity windows:
``random.Random(f"{seed}:{task}").sample``; the edit sample and the refill: ``shuffle``). The
expected values were printed by the code before the change, so a stored trajectory id still names
the same requests and examples."""

from orchestrator.driver import select_requests
from orchestrator.spec import spec_from_dict
from workers.evaluation.prompts import perplexity_windows, sample_examples, sample_fitting
from workers.sampling import seeded_order, seeded_sample


def test_requests_examples_and_windows_are_the_draws_of_the_old_samplers():
    assert seeded_sample(1000, 12, 3) == [67, 133, 243, 378, 485, 557, 594, 606, 618, 620, 640, 937]
    assert select_requests(list(range(1000)), 12, "random", 3) == seeded_sample(1000, 12, 3)
    assert seeded_sample(300, 10, "0:nli") == [2, 23, 62, 104, 122, 129, 157, 239, 269, 290]
    assert sample_examples(list(range(300)), 10, 0, "nli") == [2, 23, 62, 104, 122, 129, 157, 239, 269, 290]
    assert sample_examples(list(range(5)), 10, 0, "nli") == [0, 1, 2, 3, 4]  # fewer than asked: all
    assert sample_fitting(list(range(300)), 10, 1, "sst2", lambda x: x % 3 != 0) == (
        [13, 26, 82, 136, 187, 188, 239, 241, 263, 283], 2)  # two drawn, passed over, refilled by the shuffle
    assert sample_fitting(list(range(30)), 10, 1, "sst2", lambda x: x % 3 != 0, order="first") == (
        [1, 2, 4, 5, 7, 8, 10, 11, 13, 14], 5)
    windows = perplexity_windows(list(range(1000)), window=64, stride=32, count=6, seed=2, prefix=(7,))
    assert [pair.continuation_ids[0] for pair in windows] == [256, 448, 480, 672, 736, 768]


def test_the_edit_sample_is_the_old_shuffle():
    assert sorted(seeded_order(20, "3:edit-sample")) == list(range(20))
    spec = spec_from_dict({"experiment": "s", "models": ["tiny-gpt2"], "methods": ["rome"],
                           "datasets": ["counterfact"], "seeds": [3], "n_edits": 20, "checkpoints": [5, 10, 20],
                           "evaluation": {"edit_sample": 4}}, check_models=False, check_data=False)
    (trajectory,) = spec.trajectories()
    assert {c: trajectory.evaluated_requests(c) for c in (5, 10, 20)} == {
        5: [1, 2, 3, 4], 10: [1, 4, 8, 9], 20: [4, 8, 9, 13]}


def test_disjoint_samples_share_no_request_and_seed_0_is_randoms():
    from workers.sampling import seeded_disjoint_sample
    samples = [seeded_disjoint_sample(1000, 300, seed) for seed in range(3)]
    assert samples[0] == seeded_sample(1000, 300, 0)  # the committed study's sample stays seed 0's
    assert all(len(set(s)) == 300 and s == sorted(s) for s in samples)
    assert not set(samples[0]) & set(samples[1]) and not set(samples[0]) & set(samples[2])
    assert not set(samples[1]) & set(samples[2])
    # independent draws would overlap: at 300 of 1000, two random samples share ~90 records
    assert set(seeded_sample(1000, 300, 1)) & set(samples[0])
    assert select_requests(list(range(1000)), 300, "disjoint", 2) == samples[2]
    assert seeded_disjoint_sample(1000, 300, 2) == samples[2]  # deterministic
    import pytest
    with pytest.raises(ValueError, match="4 disjoint samples of 300 need 1200"):
        seeded_disjoint_sample(1000, 300, 3)

"""Bootstrap 95% intervals of task scores: computed at scoring time, stored, read back from old stores."""

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from scipy.stats import binom
from orchestrator.store import Store
from workers.evaluation.config import mean_row
from workers.evaluation.intervals import mean_interval, proportion_interval, ratio_interval


# The bootstrap distribution of the mean of n 0/1 values with k ones is exactly Binomial(n, k/n) / n,
# so its 2.5th / 97.5th percentiles are binomial quantiles. For these samples no binomial CDF step lies
# near 0.025 or 0.975 (8 of 16: CDF(3) = 0.011, CDF(4) = 0.038, CDF(11) = 0.962, CDF(12) = 0.989), so
# 2,000 resamples land on the exact atoms. A normal interval (0.5 ± 1.96·0.125 = [0.255, 0.745] for 8
# of 16, [-0.004, 0.379] for 3 of 16) or a standard deviation in place of the standard error fails.
@pytest.mark.parametrize("k, expected", [(8, (0.25, 0.75)), (3, (0.0, 0.375))])
def test_the_bootstrap_interval_of_an_accuracy_is_the_binomial_one(k, expected):
    n = 16
    exact = (int(binom.ppf(0.025, n, k / n)) / n, int(binom.ppf(0.975, n, k / n)) / n)
    assert exact == expected
    sample = [1.0] * k + [0.0] * (n - k)
    assert mean_interval(sample) == pytest.approx(exact, abs=1e-12)
    assert mean_interval(sample) == mean_interval(list(reversed(sample)))  # seeded: the same each time
    # The closed form used for old stores (only the mean and the count are stored there).
    assert proportion_interval(k / n, n) == pytest.approx(exact, abs=1e-12)


def test_a_ratio_interval_resamples_whole_windows():
    # Two windows of 10 tokens, one with NLL 0 per token and one with NLL 1: a resample holds both
    # (mean NLL 0.5) half the time, only the first (0) or only the second (1) a quarter of the time each,
    # so the 2.5th / 97.5th percentiles of the perplexity are exp(0) and exp(1).
    low, high = ratio_interval([0.0, 10.0], [10, 10], transform=np.exp)
    assert (low, high) == pytest.approx((1.0, math.e))
    # Windows of unequal length: a window's NLL always travels with its own token count.
    low, high = ratio_interval([2.0, 2.0, 2.0], [1, 2, 4])
    assert low < 6 / 7 < high and low >= 0.5 and high <= 2.0


def test_a_mean_row_carries_its_interval_and_an_empty_one_none():
    row = mean_row("nli", "label_ll_accuracy", [1.0] * 8 + [0.0] * 8)
    assert (row.value, row.n_examples) == (0.5, 16)
    assert (row.ci_low, row.ci_high) == pytest.approx((0.25, 0.75))
    empty = mean_row("nli", "accuracy_valid", [])
    assert math.isnan(empty.value) and empty.ci_low is None and empty.ci_high is None


def test_intervals_are_stored_and_old_files_without_them_still_read(tmp_path):
    store = Store(tmp_path / "store")
    row = mean_row("nli", "label_ll_accuracy", [1.0] * 8 + [0.0] * 8)
    store.put_evaluations("e", "new", 0, [row.as_dict()])
    # A file written before the interval columns existed (the evaluations schema of then).
    old = pa.table({"experiment": ["e"], "trajectory_id": ["old"], "n_edits": pa.array([0], pa.int64()),
                    "task": ["nli"], "metric": ["accuracy_all"], "value": [0.5],
                    "n_examples": pa.array([16], pa.int64())})
    path = tmp_path / "store" / "evaluations" / "e" / "old-at-000000.parquet"
    pq.write_table(old, path)
    frame = store.frame("evaluations", "e").set_index("trajectory_id")
    assert frame.loc["new", ["ci_low", "ci_high"]].tolist() == pytest.approx([0.25, 0.75])
    assert frame.loc["old", ["ci_low", "ci_high"]].isna().all() and frame.loc["old", "value"] == 0.5

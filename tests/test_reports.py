"""The mean ± 95% CI of per-episode values, and its reduction over ranks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metalearn.reports import mean_ci95, mean_ci95_of_sums, moment_sums


def test_mean_ci95_is_the_normal_interval_of_the_mean():
    values = torch.rand(600, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean, ci95 = mean_ci95(values)
    reference = values.numpy()
    assert mean == pytest.approx(reference.mean(), abs=1e-15)
    expected = 1.96 * reference.std(ddof=1) / math.sqrt(len(reference))
    assert ci95 == pytest.approx(expected, rel=1e-12)
    assert mean_ci95(torch.tensor([0.8])) == (pytest.approx(0.8), 0.0)
    assert mean_ci95(torch.full((5,), 0.6)) == (pytest.approx(0.6), 0.0)


def test_sums_of_the_ranks_give_the_interval_of_all_episodes():
    """Each rank's count, sum and sum of squares per column, summed, give every column's
    mean and CI over all episodes, also when a rank holds none."""
    rows = torch.rand(25, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    parts = [rows[:10], rows[10:], rows[:0]]
    means, ci95s = mean_ci95_of_sums(sum(moment_sums(part) for part in parts))
    for column in range(4):
        mean, ci95 = mean_ci95(rows[:, column])
        assert float(means[column]) == pytest.approx(mean, abs=1e-14)
        assert float(ci95s[column]) == pytest.approx(ci95, rel=1e-10)
    accuracy = np.array([0.2, 1.0, 0.6], dtype=np.float32)  # float32 rows are summed in float64
    sums = moment_sums(torch.from_numpy(accuracy)[:, None])
    assert sums.dtype == torch.float64 and sums[:, 0].tolist() == pytest.approx([3, 1.8, 1.4])

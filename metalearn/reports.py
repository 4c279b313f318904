"""Evaluation reports: accuracy ± 95% CI per setting as JSON, markdown and a plot."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from metalearn.utils.files import save_figure, write_text

__all__ = [
    "mean_ci95",
    "mean_ci95_of_sums",
    "moment_sums",
    "format_result",
    "protocol_label",
    "write_json",
    "markdown_table",
    "table",
    "plot_accuracy_vs_steps",
]


def moment_sums(values: Tensor) -> Tensor:
    """``(3, *columns)`` float64: the count, sum and sum of squares of ``values`` over their
    first dimension (one row per episode). Summed over ranks, they give the mean and CI of
    all episodes (:func:`mean_ci95_of_sums`)."""
    values = values.double()
    count = values.new_full(values.shape[1:], values.shape[0])
    return torch.stack([count, values.sum(0), (values * values).sum(0)])


def mean_ci95_of_sums(sums: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` (``std`` unbiased; 0
    for one value) from :func:`moment_sums`."""
    count, total, squares = sums.double()
    mean = total / count
    variance = ((squares - count * mean * mean) / (count - 1).clamp_min(1)).clamp_min(0)
    variance = torch.where(count > 1, variance, torch.zeros_like(variance))
    return mean, 1.96 * variance.sqrt() / count.sqrt()


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and 95% confidence half-width ``1.96 * std / sqrt(n)`` of per-episode values."""
    mean, ci95 = mean_ci95_of_sums(moment_sums(values.flatten()))
    return float(mean), float(ci95)


def format_result(result: Mapping[str, Any]) -> str:
    """One line: accuracy ± 95% CI and the setting it was measured on."""
    return (
        f"test accuracy {100 * result['accuracy']:.2f}% ± {100 * result['ci95']:.2f} "
        f"({result['episodes']} episodes, {result['ways']}-way {result['shots']}-shot, "
        f"{result['query_shots']} queries per class, T={result['inner_steps']}, "
        f"split {result['split']}, {protocol_label(result)})"
    )


def protocol_label(result: Mapping[str, Any]) -> str:
    """E.g. ``"inductive (batch_stats=support), disjoint sampler"``."""
    sampler = "disjoint" if result.get("disjoint", True) else "paper"
    return f"{result['protocol']} (batch_stats={result['batch_stats']}), {sampler} sampler"


def write_json(data: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``data`` as indented JSON, atomically (temporary file, then rename).

    inf and NaN become ``null`` (JSON has no such numbers; a bare ``NaN`` makes the file
    unreadable to strict parsers).
    """
    return write_text(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table of preformatted cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def markdown_table(results: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table: setting, protocol, inner steps, accuracy ± 95% CI, episodes."""
    header = ("setting", "protocol", "inner steps", "accuracy (%)", "episodes")
    rows = [
        (
            f"{r['ways']}-way {r['shots']}-shot, {r['query_shots']} queries",
            protocol_label(r),
            str(r["inner_steps"]),
            f"{100 * r['accuracy']:.2f} ± {100 * r['ci95']:.2f}",
            str(r["episodes"]),
        )
        for r in results
    ]
    return table(header, rows)


def plot_accuracy_vs_steps(
    curves: Mapping[str, Sequence[float]], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Plot mean query accuracy against the inner step t = 0..T, one line per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        axis.plot(range(len(curve)), [100 * a for a in curve], marker="o", label=label)
    axis.set_xlabel("inner step t")
    axis.set_ylabel("query accuracy (%)")
    axis.set_title(title or "accuracy of the episode heads after t inner steps")
    axis.grid(alpha=0.3)
    axis.legend()
    return save_figure(figure, path)

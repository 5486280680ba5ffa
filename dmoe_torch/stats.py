"""Uncertainty of evaluation results: 95% intervals and paired comparisons.

An evaluation scores n test images, each over D channel draws.  The fading of every image is
an independent draw (keyed by its sample id), and the device geometry is fixed by the seed,
so for one deployment the images are independent units: image i contributes its score
averaged over the draws, ``s_i = mean_d x[d, i]`` (correct 0/1, or energy).  The mean of the
s_i estimates the policy's expected accuracy (energy) on a new image and a new channel; its
standard error ``sd(s) / sqrt(n)`` contains both the test-set sampling error and the
channel-draw spread.  (The spread over draws alone, on one fixed test set, is much smaller
and says nothing about a new test set.)

Two settings evaluated on the same images and the same channel draws are compared per image:
``d_i = s_i(a) - s_i(b)``.  The 95% interval of the mean of d_i is paired (far narrower than
the difference of two unpaired intervals), and the exact two-sided sign test on the images
where the two differ gives a p-value; with one draw that is the exact McNemar test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import binom

Z95 = 1.959963984540054  # standard normal 97.5% quantile: mean +- Z95 * SE is a 95% interval


def per_image(values) -> np.ndarray:
    """Scores [D, n] (D draws of n images, or a single draw [n]) -> per-image mean over draws [n]."""
    array = np.asarray(values, dtype=np.float64)
    return array if array.ndim == 1 else array.mean(axis=0)


def mean_ci95(values) -> tuple[float, float]:
    """(mean, half-width of its 95% interval) of per-image scores [D, n] or [n].

    Normal approximation over images: ``Z95 * sd(s) / sqrt(n)`` with the sample standard
    deviation (ddof 1) of the per-image means s; nan half-width with fewer than 2 images.
    """
    s = per_image(values)
    if len(s) == 0:
        return math.nan, math.nan
    if len(s) < 2:
        return float(s.mean()), math.nan
    return float(s.mean()), float(Z95 * s.std(ddof=1) / math.sqrt(len(s)))


def sign_test_p(wins: int, losses: int) -> float:
    """Exact two-sided sign test: P(a split at least as uneven as wins:losses | fair coin).

    ``min(1, 2 * P(Binomial(wins + losses, 1/2) <= min(wins, losses)))``; 1.0 when both are 0.
    On 0/1 outcomes of one draw, wins and losses are McNemar's discordant counts b and c.
    """
    m = wins + losses
    if m == 0:
        return 1.0
    return float(min(1.0, 2.0 * binom.cdf(min(wins, losses), m, 0.5)))


@dataclass(frozen=True)
class PairedComparison:
    """Setting a minus setting b on the same images (and channel draws)."""

    diff: float  # mean per-image difference (accuracy: a fraction, 0.01 = 1 pp)
    ci95: float  # half-width of its paired 95% interval
    wins: int  # images where a scores higher than b
    losses: int  # images where a scores lower than b
    p_value: float  # exact two-sided sign test (McNemar's exact test with one draw)


def paired_comparison(a, b) -> PairedComparison:
    """Compare per-image scores ``a`` and ``b`` ([D, n] or [n], same images in the same order)."""
    sa, sb = per_image(a), per_image(b)
    if sa.shape != sb.shape:
        raise ValueError(f"paired_comparison: {sa.shape} and {sb.shape} images differ")
    d = sa - sb
    diff, ci95 = mean_ci95(d)
    wins, losses = int((d > 0).sum()), int((d < 0).sum())
    return PairedComparison(diff, ci95, wins, losses, sign_test_p(wins, losses))


def pareto_front(energy, accuracy) -> np.ndarray:
    """Indices of the points no other point beats (lower or equal energy and higher or equal
    accuracy, one strictly), sorted by energy: the accuracy-vs-energy trade-off curve."""
    energy = np.asarray(energy, dtype=np.float64)
    accuracy = np.asarray(accuracy, dtype=np.float64)
    order = np.lexsort((-accuracy, energy))  # by energy, then best accuracy first
    front, best = [], -math.inf
    for index in order:
        if accuracy[index] > best:
            front.append(int(index))
            best = accuracy[index]
    return np.asarray(front, dtype=np.int64)

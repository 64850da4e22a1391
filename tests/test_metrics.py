"""Correlation metrics against hand-checkable values."""

import math

import numpy as np

from hyperiqa_jax import metrics


def test_perfect_and_reversed():
    mos = np.array([10.0, 20, 35, 50, 80])
    m = metrics.compute_all(mos * 2 + 1, mos)
    assert abs(m["srcc"] - 1) < 1e-12 and abs(m["plcc"] - 1) < 1e-12
    assert abs(m["krcc"] - 1) < 1e-12
    assert m["num_images"] == 5
    assert abs(metrics.srcc(-mos, mos) + 1) < 1e-12


def test_rank_metrics_ignore_monotone_distortion():
    rng = np.random.default_rng(0)
    mos = rng.uniform(0, 100, 200)
    pred = np.exp(mos / 20)  # monotone, very non-linear
    m = metrics.compute_all(pred, mos)
    assert abs(m["srcc"] - 1) < 1e-12
    assert m["plcc"] < 0.9
    assert m["plcc_logistic"] > 0.98  # the logistic fit straightens it out
    np.testing.assert_allclose(metrics.rmse(mos + 3, mos), 3.0)


def test_logistic_recovers_sigmoid():
    x = np.linspace(-3, 3, 50)
    y = metrics.logistic4(x, 90, 10, 0.5, 0.7)
    np.testing.assert_allclose(metrics.fit_logistic4(x, y), y, atol=1e-4)


def test_constant_prediction_is_nan_not_error():
    m = metrics.compute_all(np.ones(10), np.arange(10.0))
    assert math.isnan(m["srcc"]) and math.isnan(m["plcc"]) and math.isnan(m["plcc_logistic"])
    assert m["rmse"] > 0

"""IQA correlation metrics: SRCC, PLCC, KRCC, RMSE and PLCC after a logistic fit.

All take per-image predictions and MOS (crop scores already averaged). A
constant prediction has no defined correlation: those metrics come back NaN
rather than raising, so an early, collapsed model can still be logged.
"""

import warnings

import numpy as np
from scipy import optimize, stats


def logistic4(x, b1, b2, b3, b4):
    """The standard 4-parameter logistic mapping prediction -> MOS (VQEG)."""
    return (b1 - b2) / (1 + np.exp(-(x - b3) / np.abs(b4))) + b2


def _logistic4_jac(x, b1, b2, b3, b4):
    # Analytic: finite differences cannot move b3 when it starts at 0.
    s = 1 / (1 + np.exp(-(x - b3) / np.abs(b4)))
    ds = (b1 - b2) * s * (1 - s)
    return np.stack([s, 1 - s, -ds / np.abs(b4), -ds * (x - b3) * np.sign(b4) / b4**2], -1)


def fit_logistic4(pred, mos):
    """Least-squares fit of `logistic4`; returns the mapped predictions (or pred on failure).

    The fit has local minima, so a few slopes are tried and the best kept.
    """
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    best, best_sse = pred, np.inf
    for slope in (0.25, 1.0, 4.0):
        p0 = [mos.max(), mos.min(), np.mean(pred), slope * np.std(pred) + 1e-8]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                params, _ = optimize.curve_fit(logistic4, pred, mos, p0=p0, jac=_logistic4_jac,
                                                maxfev=20000)
                mapped = logistic4(pred, *params)
        except (RuntimeError, ValueError, optimize.OptimizeWarning):
            continue
        sse = np.sum((mapped - mos) ** 2)
        if np.all(np.isfinite(mapped)) and sse < best_sse:
            best, best_sse = mapped, sse
    return best


def _safe(fn, a, b):
    if len(a) < 2 or np.std(a) == 0 or np.std(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(a, b)[0])


def srcc(pred, mos):
    return _safe(stats.spearmanr, np.asarray(pred), np.asarray(mos))


def plcc(pred, mos):
    return _safe(stats.pearsonr, np.asarray(pred), np.asarray(mos))


def krcc(pred, mos):
    return _safe(stats.kendalltau, np.asarray(pred), np.asarray(mos))


def rmse(pred, mos):
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    return float(np.sqrt(np.mean((pred - mos) ** 2)))


def compute_all(pred, mos):
    """Returns {'srcc', 'plcc', 'krcc', 'rmse', 'plcc_logistic', 'num_images'}.

    plcc and rmse are on the raw predictions (same scale as the labels);
    plcc_logistic is PLCC after mapping predictions with the fitted logistic.
    """
    pred, mos = np.asarray(pred, np.float64), np.asarray(mos, np.float64)
    if pred.shape != mos.shape:
        raise ValueError(f"pred {pred.shape} and mos {mos.shape} differ in shape")
    fitted = fit_logistic4(pred, mos) if len(pred) >= 5 and np.std(pred) > 0 else pred
    return {
        "srcc": srcc(pred, mos),
        "plcc": plcc(pred, mos),
        "krcc": krcc(pred, mos),
        "rmse": rmse(pred, mos),
        "plcc_logistic": plcc(fitted, mos),
        "num_images": int(len(pred)),
    }

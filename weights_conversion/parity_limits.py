"""How far the JAX models may differ from PyTorch, and the difference those limits bound.

One definition of every parity limit, used by `validate_parity` (the command
users run on a converted checkpoint), `convert_timm`'s check before it saves,
and the tests.

Forward limits are relative: a bound on an output's largest absolute
difference, in units of its magnitude, the larger of the reference's largest
|value| and 1. Float32 rounding grows with the size of what is computed (a score
of 92 carries 8 times the rounding of a score near 10), and it differs between
CPUs (vector widths and summation orders), so an absolute bound that holds on one
machine can fail on another for the same correct model; the floor at 1 keeps an
output near zero from being held to more than absolute precision. Each bound is
at least 10 times the largest value measured over the parity suite (every
config, on both `kernels` paths, the SMART-IQA checkpoint case and Swin-T at full
depth; for the training steps, the configs of tests/weights_conversion/
test_hyperiqa_parity.py on both paths).
"""

import numpy as np

# Bounds on |difference| / magnitude, each >= 15x the largest ratio measured over the suite.
SCORE_RELATIVE = 5e-5  # measured <= 1.7e-6 (Swin-T full depth, generic kernels).
ATTENTION_RELATIVE = 5e-5  # measured <= 3.2e-6 (attention weights lie in 0..1).
INTERMEDIATE_RELATIVE = 5e-5  # measured <= 2.2e-6 (stage maps, LDA vector, fused map, ...).
SWIN_STAGE_RELATIVE = 5e-5  # measured <= 1.7e-6 (Swin-T and Swin-B at 192..256 px).

# Training steps (see train_step_limits), each >= 10x the largest value measured.
LOSS_RELATIVE = 1e-5  # measured <= 9.0e-7.
GRAD_RELATIVE = 1e-4  # measured <= 9.9e-6.
GRAD_RELATIVE_KINKED = 0.2  # measured <= 1.6e-2 (ResNet-50), 5.3e-3 (Swin heads).
UPDATE_IN_LR = 2e-4  # measured <= 1.05e-5 (float32 betas in the bias corrections).
BATCH_STATS_RELATIVE = 1e-5  # measured <= 6.3e-7.


def difference(jax_value, torch_value) -> dict:
    """max_abs, max_rel (element-wise, floored at 1e-6) and ref_max_abs of two arrays."""
    a = np.asarray(jax_value, np.float64)
    b = np.asarray(torch_value, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: jax {a.shape} vs torch {b.shape}")
    abs_diff = np.abs(a - b)
    return {"max_abs": float(abs_diff.max()),
            "max_rel": float((abs_diff / (np.abs(b) + 1e-6)).max()),
            "ref_max_abs": float(np.abs(b).max())}


def magnitude(ref_max_abs: float) -> float:
    """What a relative limit is in units of: max(largest |reference value|, 1)."""
    return max(float(ref_max_abs), 1.0)


def score_limit(ref_max_abs: float) -> float:
    """The largest allowed |jax - torch| over scores whose largest |torch score| is given."""
    return SCORE_RELATIVE * magnitude(ref_max_abs)


def attention_limit(ref_max_abs: float) -> float:
    return ATTENTION_RELATIVE * magnitude(ref_max_abs)


def intermediate_limit(ref_max_abs: float) -> float:
    return INTERMEDIATE_RELATIVE * magnitude(ref_max_abs)


def forward_limit(name: str, ref_max_abs: float) -> float:
    """The limit of a full-model output named as `hyperiqa_parity.forward_parity` names it."""
    if name == "score":
        return score_limit(ref_max_abs)
    if name == "attention":
        return attention_limit(ref_max_abs)
    return intermediate_limit(ref_max_abs)


def swin_stage_limit(ref_max_abs: float, relative: float = SWIN_STAGE_RELATIVE) -> float:
    """The limit of one Swin stage map against timm's (`relative`: validate_parity's
    --tolerance)."""
    return relative * magnitude(ref_max_abs)


def train_step_limits(result: dict) -> dict:
    """The bound on each `hyperiqa_parity.train_step_parity` figure, from measured float error.

    Gradients at the same parameters, relative in the L2 norm per tensor: GRAD_RELATIVE
    at steps with no ReLU input near 0, GRAD_RELATIVE_KINKED at the others (an input
    that falls on the other side of the kink in one framework moves the gradients by
    its whole contribution). The optimisers' updates on the same gradients, in units of
    the group's lr: UPDATE_IN_LR. The loss and the BatchNorm statistics: relative to
    max(|value|, 1).
    """
    limits = {"loss": LOSS_RELATIVE * magnitude(result["loss_value"]),
              "update_diff_in_lr": UPDATE_IN_LR}
    if "grad_rel" in result:
        limits["grad_rel"] = GRAD_RELATIVE
    if "grad_rel_kinked" in result:
        limits["grad_rel_kinked"] = GRAD_RELATIVE_KINKED
    if "batch_stats_rel" in result:
        limits["batch_stats_rel"] = BATCH_STATS_RELATIVE
    return limits

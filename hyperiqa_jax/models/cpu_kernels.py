"""XLA:CPU versions of four Swin pieces, and the switch that picks them per platform.

The model (models/swin.py) is written once, in plain JAX and plain autodiff. Four
of its operations have a second implementation here that computes the same
numbers (to float rounding) in a form XLA's CPU backend runs faster. None of
them helps a GPU or a TPU, and three of them hurt there: the barrier is a
data-dependent conditional (XLA:GPU copies its predicate to the host and blocks
the stream; it also ends a CUDA graph), and the forced transposed copies are
pure memory traffic where XLA would fold the transpose into the cuBLAS call.

`kernels` selects them:
- "auto" (default): `jax.lax.platform_dependent` picks when the function is
  lowered: these kernels for "cpu", the plain ones for every other platform
  (and, for "tpu", window attention's Pallas kernels, models/tpu_kernels.py).
  A function lowered for cuda or tpu contains none of this module's code.
- "cpu": these kernels on every platform (for tests of this path).
- "generic": the plain implementations on every platform, the CPU included.

- `materialize_grad` (plain: identity): the block input's gradient is computed
  once, into its own buffer. Without it XLA:CPU fuses the residual stream's
  chain of gradient additions into every block's backward and recomputes it
  there: work quadratic in the depth.
- `cpu_matmul` (plain: `x @ kernel`): the weight gradient transposes the
  narrower operand; XLA transposes dy even when it is 3-4x wider (qkv, fc1).
- `cpu_window_attention` (plain: `jax.nn.dot_product_attention`): head-major
  layout and a hand-written backward whose query-axis products read transposed
  copies, so that XLA:CPU runs them in YNNPACK.
- `cpu_patch_projection` (plain: the strided convolution): one product of
  flattened patches, about twice as fast on XLA:CPU.

docs/models.md and docs/benchmarks.md give the measurements.
"""

import jax
import jax.numpy as jnp

KERNELS = ("auto", "cpu", "generic")


def choose(kernels: str, cpu_fn, generic_fn, *args, tpu_fn=None):
    """cpu_fn(*args) or generic_fn(*args), by `kernels` (see the module docstring); with
    "auto", tpu_fn(*args) on a TPU where given (models/tpu_kernels.py)."""
    if kernels == "generic":
        return generic_fn(*args)
    if kernels == "cpu":
        return cpu_fn(*args)
    if kernels == "auto":
        tpu = {} if tpu_fn is None else {"tpu": tpu_fn}
        return jax.lax.platform_dependent(*args, cpu=cpu_fn, default=generic_fn, **tpu)
    raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")


# ----------------------------------------------------------------------------
# Barriers.


def _materialize(x):
    """x, computed into its own buffer that XLA cannot fuse through or fold away.

    XLA:CPU drops optimization barriers before fusing; a conditional on the data
    is a boundary it keeps. It passes x through unless x's first element is NaN,
    in which case all of x becomes NaN (it is broken anyway).
    """
    first = x.reshape(-1)[0]
    return jax.lax.cond(first == first, lambda t: t, lambda t: jnp.full_like(t, jnp.nan), x)


def _transposed_copy(x):
    """x with its last two axes swapped, materialised in that layout.

    Without the barrier XLA folds the transpose into the dimension numbers of
    the product that reads it, and XLA:CPU runs a product whose left operand
    contracts a non-minor axis outside YNNPACK, several times slower.
    """
    return _materialize(jnp.swapaxes(x, -1, -2))


@jax.custom_vjp
def materialize_grad(x):
    """Identity whose incoming gradient is computed once, into a buffer.

    Without it XLA's CPU backend fuses the residual stream's whole chain of
    gradient additions into every block's backward fusions and recomputes it
    in each: work quadratic in the depth (the Swin-B E6 train step took 12.1 s
    instead of 6.8 s at batch 8 on 2 cores).
    """
    return x


materialize_grad.defvjp(lambda x: (x, None), lambda _, g: (_materialize(g),))


# ----------------------------------------------------------------------------
# Matrix product with a chosen weight-gradient transpose.


@jax.custom_vjp
def cpu_matmul(x, kernel):
    """x @ kernel for x [M, K]; the weight gradient transposes the narrower operand."""
    return x @ kernel


def _matmul_fwd(x, kernel):
    return x @ kernel, (x, kernel)


def _matmul_bwd(residuals, dy):
    # The weight gradient contracts the M rows of x and dy, so one of them must
    # be transposed; autodiff leaves the choice to XLA, which transposes dy even
    # when it is 3-4x wider than x.
    x, kernel = residuals
    if x.shape[1] <= dy.shape[1]:
        d_kernel = _transposed_copy(x) @ dy
    else:
        d_kernel = (_transposed_copy(dy) @ x).T
    return dy @ kernel.T, d_kernel


cpu_matmul.defvjp(_matmul_fwd, _matmul_bwd)


# ----------------------------------------------------------------------------
# Window attention, head-major, with a hand-written backward.


def _attention_forward(q, k, v, bias):
    logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q, k).astype(jnp.float32) + bias
    weights = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bwhqk,bwhkd->bwhqd", weights.astype(v.dtype), v), weights


@jax.custom_vjp
def window_attention_core(q, k, v, bias):
    """softmax(q k^T + bias) v over [B, nW, heads, N, d]; bias broadcasts to the logits.

    The gradient is written out so that its two products over the query axis
    (dk = dlogits^T q, dv = weights^T dout) read explicitly transposed copies.
    Left to autodiff, XLA folds those transposes into the products, and XLA:CPU
    runs a product that contracts its left operand's second-to-last axis
    outside YNNPACK at a tenth of the speed. The values agree with autodiff's up
    to float rounding (not bit for bit).
    """
    return _attention_forward(q, k, v, bias)[0]


def _attention_fwd(q, k, v, bias):
    out, weights = _attention_forward(q, k, v, bias)
    return out, (q, k, v, weights, bias.shape)


def _attention_bwd(residuals, dout):
    q, k, v, weights, bias_shape = residuals
    d_weights = jnp.einsum("bwhqd,bwhkd->bwhqk", dout, v).astype(jnp.float32)
    d_logits = weights * (d_weights - jnp.sum(d_weights * weights, axis=-1, keepdims=True))
    dv = jnp.einsum("bwhkq,bwhqd->bwhkd", _transposed_copy(weights.astype(v.dtype)), dout)
    d_logits_c = d_logits.astype(q.dtype)
    dq = jnp.einsum("bwhqk,bwhkd->bwhqd", d_logits_c, k)
    dk = jnp.einsum("bwhkq,bwhqd->bwhkd", _transposed_copy(d_logits_c), q)
    lead = d_logits.ndim - len(bias_shape)
    d_bias = jnp.sum(d_logits, axis=tuple(range(lead)))
    d_bias = jnp.sum(d_bias, axis=tuple(i for i, s in enumerate(bias_shape) if s == 1),
                     keepdims=True)
    return dq, dk, dv, d_bias


window_attention_core.defvjp(_attention_fwd, _attention_bwd)


def cpu_window_attention(qkv, bias, *, num_heads: int):
    """`swin.window_attention` (same arguments and result) in the head-major CPU layout."""
    b, nw, n, c3 = qkv.shape
    c = c3 // 3
    head_dim = c // num_heads
    # One transpose to [3, B, nW, heads, N, d]: q, k, v are then contiguous
    # slices, both einsums need no further transposes, and the gradient of the
    # split is a concatenation along the leading axis.
    qkv = qkv.reshape(b, nw, n, 3, num_heads, head_dim).transpose(3, 0, 1, 4, 2, 5)
    q, k, v = (t[0] for t in jnp.split(qkv, 3, axis=0))
    out = window_attention_core(q * (head_dim ** -0.5), k, v, bias)
    return out.transpose(0, 1, 3, 2, 4).reshape(b, nw, n, c)


# ----------------------------------------------------------------------------
# Patch projection as one product.


def cpu_patch_projection(x, kernel):
    """`swin.patch_projection` (p x p kernel, stride p, VALID) as flattened patches @ kernel."""
    p, _, c, features = kernel.shape
    b, h, w, _ = x.shape
    # [B, H/p, p, W/p, p, C] -> [B, H/p, W/p, p, p, C]: the kernel's (dy, dx, c) order.
    patches = x[:, :h - h % p, :w - w % p].reshape(b, h // p, p, w // p, p, c)
    patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(-1, p * p * c)
    y = cpu_matmul(patches, kernel.reshape(p * p * c, features))
    return y.reshape(b, h // p, w // p, features)

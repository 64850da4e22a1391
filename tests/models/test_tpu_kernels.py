"""Window attention's Pallas TPU kernels, run by Pallas' interpreter on the CPU.

The interpreter runs the kernels' own code (blocks, lane masks, the hand-written
backward) with XLA:CPU's arithmetic. The TPU compiler (libtpu) compiles the same code
(`python -m hyperiqa_jax.aot --target=tpu:v5p-8 --config=configs/base.py`); it has not
been run on a TPU yet.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hyperiqa_jax.models import swin, tpu_kernels

HEADS, HEAD_DIM, TOKENS = 8, 32, 49  # two 128-lane groups of four heads


def formula(qkv, bias, mask):
    """softmax(q k^T / sqrt(d) + bias [+ mask]) v per window and head, in float32."""
    b, w, n, c3 = qkv.shape
    q, k, v = (t.reshape(b, w, n, HEADS, HEAD_DIM).transpose(0, 1, 3, 2, 4).astype(jnp.float32)
               for t in jnp.split(qkv, 3, axis=-1))
    logits = jnp.einsum("bwhqd,bwhkd->bwhqk", q * HEAD_DIM ** -0.5, k) + bias
    if mask is not None:
        logits = logits + mask[:, None]
    out = jnp.einsum("bwhqk,bwhkd->bwhqd", jax.nn.softmax(logits, axis=-1), v)
    return out.transpose(0, 1, 3, 2, 4).reshape(b, w, n, c3 // 3)


def inputs(dtype, windows=4, images=2):
    keys = jax.random.split(jax.random.key(0), 4)
    qkv = jax.random.normal(keys[0], (images, windows, TOKENS, 3 * HEADS * HEAD_DIM), dtype)
    bias = jax.random.normal(keys[1], (HEADS, TOKENS, TOKENS))
    # Swin's shift mask: 0 within a region, -100 across regions.
    mask = jnp.asarray(swin.shifted_window_mask(14, 14, (7, 7), (3, 3)))
    dout = jax.random.normal(keys[3], qkv.shape[:-1] + (HEADS * HEAD_DIM,), dtype)
    return qkv, bias, mask, dout


def value_and_grads(attention, qkv, bias, mask, dout):
    out, vjp = jax.vjp(lambda x, b: attention(x, b, mask), qkv, bias)
    return (out, *vjp(dout))


def kernel(qkv, bias, mask):
    return tpu_kernels.window_attention(qkv, bias, mask, num_heads=HEADS, interpret=True)


def xla(qkv, bias, mask):
    """The path the kernels replace: swin.window_attention, compiled by XLA."""
    return swin.window_attention(qkv, bias if mask is None else bias[None] + mask[:, None],
                                 num_heads=HEADS)


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("reference", [xla, formula], ids=["xla", "formula"])
def test_kernels_compute_what_xla_does_and_its_gradient(shifted, reference):
    qkv, bias, mask, dout = inputs(jnp.float32)
    mask = mask if shifted else None
    got = value_and_grads(kernel, qkv, bias, mask, dout)
    want = value_and_grads(reference, qkv, bias, mask, dout)
    for name, g, w in zip(("output", "qkv gradient", "bias gradient"), got, want):
        # float32 rounding: measured below 3e-7 of the largest value.
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()),
                                   err_msg=name)


def test_bfloat16_kernels_are_as_close_to_float32_as_xla_is():
    # In bfloat16 the kernels round the probabilities and the logits' gradient before
    # their products, as the XLA path rounds the probabilities; against float32 the two
    # differ from the exact values by the same order (measured: the kernels' error at most
    # 1.0x the XLA path's, and below 0.5% of the largest value).
    qkv, bias, mask, dout = inputs(jnp.bfloat16)
    exact = value_and_grads(formula, qkv.astype(jnp.float32), bias, mask,
                            dout.astype(jnp.float32))

    for ours, theirs, want in zip(value_and_grads(kernel, qkv, bias, mask, dout),
                                  value_and_grads(xla, qkv, bias, mask, dout), exact):
        ours_error = float(jnp.abs(ours.astype(jnp.float32) - want).max())
        xla_error = float(jnp.abs(theirs.astype(jnp.float32) - want).max())
        assert ours_error <= 10 * xla_error, (ours_error, xla_error)
        assert ours_error < 0.05 * float(jnp.abs(want).max())


def test_blocks_line_up_with_the_mask_within_the_budget():
    # Swin-B at 224 px and a batch of 128: (windows per image, channels) per stage.
    stages = [(64, 128), (16, 256), (4, 512), (1, 1024)]
    blocks = [tpu_kernels.windows_per_block(128, w, TOKENS, c, 2) for w, c in stages]
    assert blocks == [16, 16, 8, 4]
    for (windows, channels), g in zip(stages, blocks):
        # A part of one image's windows, or whole images.
        assert windows % g == 0 or (g % windows == 0 and 128 % (g // windows) == 0)
        assert g * 56 * 3 * channels * 2 <= tpu_kernels.QKV_BYTES
        assert g * 56 * 128 * 4 <= tpu_kernels.LOGITS_BYTES
    # Three images of four windows: whole images that divide the batch.
    assert tpu_kernels.windows_per_block(3, 4, TOKENS, 128, 2) == 12


def test_blocks_of_part_of_an_image_see_their_own_mask_rows():
    qkv, bias, mask, dout = inputs(jnp.float32, images=1)
    budget = tpu_kernels.QKV_BYTES
    try:  # blocks of two windows: the four windows' mask rows in two halves
        tpu_kernels.QKV_BYTES = 2 * 56 * qkv.shape[-1] * 4
        assert tpu_kernels.windows_per_block(1, 4, TOKENS, HEADS * HEAD_DIM, 4) == 2
        got = value_and_grads(kernel, qkv, bias, mask, dout)
    finally:
        tpu_kernels.QKV_BYTES = budget
    want = value_and_grads(formula, qkv, bias, mask, dout)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5 * float(jnp.abs(w).max()))


def test_layers_the_kernels_take():
    assert tpu_kernels.supported(128, 4) and tpu_kernels.supported(1024, 32)
    assert not tpu_kernels.supported(96, 3)    # Swin-T's first stage: 96 lanes
    assert not tpu_kernels.supported(24, 1)    # the demo model

"""Swin's window attention as Pallas TPU kernels: the logits never leave the chip.

Compiled by XLA, window attention writes every window's logits, probabilities and
their gradients to HBM, in TPU tiles of 8 x 128 that a 49 x 49 matrix fills to a
third, and copies q, k and v between the token-major layout of the qkv product and
the head-major one of the attention products, each time with the 32-wide head axis
padded to 128 lanes. The two kernels here (forward, and backward with the logits
recomputed) read the qkv product as the Dense layer wrote it, [windows, N, 3C], and
write the output, [windows, N, C], and the gradient of qkv the same way: nothing
window-sized in between goes to HBM (docs/benchmarks.md, "Compiled for TPU and GPU
without a device", has the measured effect).

Inside a kernel the channels go in 128-lane groups of 128 / head_dim heads; a head's
products contract its group with the other heads' lanes zeroed, which costs the MXU
what a 32-wide contraction costs it (it pads to 128), and avoids lane shuffles. The
numbers are those of `swin.window_attention` up to float rounding: float32 logits,
softmax and accumulation, probabilities and logit gradients rounded to the compute
dtype before their products (as flash attention does).

`window_attention` is for TPUs (swin.py picks it with `kernels="auto"` when the step is
lowered for a TPU) and, with `interpret=True`, runs anywhere. The kernels are checked
against the XLA version in Pallas' interpreter on the CPU and compiled by the TPU
compiler (libtpu) without a device; they have not been run on a TPU yet.
Data-parallel callers (train.py's `data` mesh) run it per device with `shard_map`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.sharding import PartitionSpec as P

LANES = 128
# VMEM per grid step, within the 16 MiB TPUs give a kernel by default: a block's qkv
# slice, and one head's float32 logits, of which the backward keeps about ten.
QKV_BYTES = 2 * 2**20
LOGITS_BYTES = 2**19


def supported(channels: int, num_heads: int) -> bool:
    """Whether the kernels take this layer: channels in whole 128-lane groups of heads."""
    head_dim = channels // num_heads
    return channels % LANES == 0 and LANES % head_dim == 0


def _pad(n, multiple):
    return -(-n // multiple) * multiple


def windows_per_block(images: int, windows: int, tokens: int, channels: int,
                      itemsize: int) -> int:
    """Windows a grid step takes: a part of an image's windows or whole images (so that
    the shift mask, per window position, lines up with every block), as many as fit the
    VMEM budget."""
    sizes = [g for g in range(1, windows + 1) if windows % g == 0]
    sizes += [k * windows for k in range(2, images + 1) if images % k == 0]
    best = 1
    for g in sizes:
        qkv = g * _pad(tokens, 8) * 3 * channels * itemsize
        logits = g * _pad(tokens, 8) * _pad(tokens, LANES) * 4
        if qkv <= QKV_BYTES and logits <= LOGITS_BYTES:
            best = max(best, g)
    return best


def _head_lanes(j, head_dim):
    lane = jax.lax.broadcasted_iota(jnp.int32, (1, 1, LANES), 2)
    return (lane >= j * head_dim) & (lane < (j + 1) * head_dim)


def _probabilities(q, k, bias, mask):
    """softmax(q k^T + bias [+ mask]) in float32; q, k: [G, N, lanes]."""
    s = jnp.einsum("gqc,gkc->gqk", q, k, preferred_element_type=jnp.float32) + bias[None]
    if mask is not None:  # the block's windows, or one image's, repeated
        g, n, _ = s.shape
        windows = mask.shape[0]
        s = (s.reshape(g // windows, windows, n, n) + mask[None]).reshape(g, n, n)
    s = s - jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=-1, keepdims=True)


def _groups(channels, num_heads):
    """(lane offset of each 128-lane group, heads per group, head_dim)."""
    head_dim = channels // num_heads
    return range(0, channels, LANES), LANES // head_dim, head_dim


def _forward_kernel(qkv_ref, bias_ref, *refs, num_heads, scale, masked):
    mask_ref, out_ref = refs if masked else (None, refs[0])
    channels = out_ref.shape[-1]
    mask = mask_ref[...] if masked else None
    offsets, per_group, head_dim = _groups(channels, num_heads)
    for group, lo in enumerate(offsets):
        q = qkv_ref[:, :, lo:lo + LANES]
        q = q * jnp.asarray(scale, q.dtype)
        k = qkv_ref[:, :, channels + lo:channels + lo + LANES]
        v = qkv_ref[:, :, 2 * channels + lo:2 * channels + lo + LANES]
        out = jnp.zeros(q.shape, jnp.float32)
        for j in range(per_group):
            lanes = _head_lanes(j, head_dim)
            p = _probabilities(jnp.where(lanes, q, 0), k, bias_ref[group * per_group + j], mask)
            pv = jnp.einsum("gqk,gkc->gqc", p.astype(v.dtype), v,
                            preferred_element_type=jnp.float32)
            out = out + jnp.where(lanes, pv, 0.0)
        out_ref[:, :, lo:lo + LANES] = out.astype(out_ref.dtype)


def _backward_kernel(qkv_ref, dout_ref, bias_ref, *refs, num_heads, scale, masked):
    mask_ref, dqkv_ref, dbias_ref = refs if masked else (None, *refs)
    channels = dout_ref.shape[-1]
    mask = mask_ref[...] if masked else None
    offsets, per_group, head_dim = _groups(channels, num_heads)
    dtype = dqkv_ref.dtype
    for group, lo in enumerate(offsets):
        q = qkv_ref[:, :, lo:lo + LANES]
        q = q * jnp.asarray(scale, q.dtype)
        k = qkv_ref[:, :, channels + lo:channels + lo + LANES]
        v = qkv_ref[:, :, 2 * channels + lo:2 * channels + lo + LANES]
        dout = dout_ref[:, :, lo:lo + LANES]
        dq = jnp.zeros(q.shape, jnp.float32)
        dk = jnp.zeros(q.shape, jnp.float32)
        dv = jnp.zeros(q.shape, jnp.float32)
        for j in range(per_group):
            head = group * per_group + j
            lanes = _head_lanes(j, head_dim)
            q_head = jnp.where(lanes, q, 0)
            dout_head = jnp.where(lanes, dout, 0)
            p = _probabilities(q_head, k, bias_ref[head], mask)
            dp = jnp.einsum("gqc,gkc->gqk", dout_head, v, preferred_element_type=jnp.float32)
            ds = p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True))
            dbias_ref[0, head] = jnp.sum(ds, axis=0)
            ds_c = ds.astype(dtype)
            dq = dq + jnp.where(lanes, jnp.einsum("gqk,gkc->gqc", ds_c, k,
                                                  preferred_element_type=jnp.float32), 0.0)
            dk = dk + jnp.einsum("gqk,gqc->gkc", ds_c, q_head,
                                 preferred_element_type=jnp.float32)
            dv = dv + jnp.einsum("gqk,gqc->gkc", p.astype(dtype), dout_head,
                                 preferred_element_type=jnp.float32)
        dqkv_ref[:, :, lo:lo + LANES] = (dq * scale).astype(dtype)
        dqkv_ref[:, :, channels + lo:channels + lo + LANES] = dk.astype(dtype)
        dqkv_ref[:, :, 2 * channels + lo:2 * channels + lo + LANES] = dv.astype(dtype)


def _cost(windows, tokens, num_heads, products, elementwise, moved):
    """What a kernel costs, for XLA's scheduler and step-time estimate: every product at
    the size the MXU runs it (tokens to 8 rows, lanes and keys to 128), the softmax's
    exponentials, and the bytes it reads and writes."""
    rows = _pad(tokens, 8)
    logits = windows * num_heads * rows * _pad(tokens, LANES)
    return pl.CostEstimate(flops=products * windows * num_heads * 2 * rows * LANES * LANES
                           + elementwise * logits,
                           transcendentals=logits, bytes_accessed=moved)


def _blocks(qkv):
    images, windows, tokens, channels3 = qkv.shape
    g = windows_per_block(images, windows, tokens, channels3 // 3, qkv.dtype.itemsize)
    return g, images * windows // g


def _whole(x):
    return pl.BlockSpec(x.shape, lambda i: (0,) * x.ndim)


def _mask_spec(mask, g):
    """The mask rows of a block's windows: all of them when a block holds whole images."""
    windows, n, _ = mask.shape
    if g >= windows:
        return _whole(mask)
    return pl.BlockSpec((g, n, n), lambda i: (i % (windows // g), 0, 0))


def _forward(qkv, bias, mask, *, num_heads, interpret):
    images, windows, tokens, channels3 = qkv.shape
    channels = channels3 // 3
    g, steps = _blocks(qkv)
    flat = qkv.reshape(images * windows, tokens, channels3)
    inputs = [flat, bias] + ([mask] if mask is not None else [])
    rows = images * windows * tokens
    out = pl.pallas_call(
        functools.partial(_forward_kernel, num_heads=num_heads,
                          scale=(channels // num_heads) ** -0.5, masked=mask is not None),
        grid=(steps,),
        in_specs=[pl.BlockSpec((g, tokens, channels3), lambda i: (i, 0, 0)), _whole(bias),
                  *([] if mask is None else [_mask_spec(mask, g)])],
        out_specs=pl.BlockSpec((g, tokens, channels), lambda i: (i, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((images * windows, tokens, channels), qkv.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(images * windows, tokens, num_heads, products=2, elementwise=8,
                            moved=4 * rows * channels * qkv.dtype.itemsize),
        interpret=interpret)(*inputs)
    return out.reshape(images, windows, tokens, channels)


def _backward(qkv, dout, bias, mask, *, num_heads, interpret):
    images, windows, tokens, channels3 = qkv.shape
    channels = channels3 // 3
    g, steps = _blocks(qkv)
    flat = qkv.reshape(images * windows, tokens, channels3)
    inputs = [flat, dout.reshape(images * windows, tokens, channels), bias] + (
        [mask] if mask is not None else [])
    rows = images * windows * tokens
    dqkv, dbias = pl.pallas_call(
        functools.partial(_backward_kernel, num_heads=num_heads,
                          scale=(channels // num_heads) ** -0.5, masked=mask is not None),
        grid=(steps,),
        in_specs=[pl.BlockSpec((g, tokens, channels3), lambda i: (i, 0, 0)),
                  pl.BlockSpec((g, tokens, channels), lambda i: (i, 0, 0)), _whole(bias),
                  *([] if mask is None else [_mask_spec(mask, g)])],
        out_specs=[pl.BlockSpec((g, tokens, channels3), lambda i: (i, 0, 0)),
                   pl.BlockSpec((1, num_heads, tokens, tokens), lambda i: (i, 0, 0, 0))],
        out_shape=[jax.ShapeDtypeStruct(flat.shape, qkv.dtype),
                   jax.ShapeDtypeStruct((steps, num_heads, tokens, tokens), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        cost_estimate=_cost(images * windows, tokens, num_heads, products=5, elementwise=16,
                            moved=8 * rows * channels * qkv.dtype.itemsize),
        interpret=interpret)(*inputs)
    # Each block's bias gradient, summed over the blocks (a few MB at most).
    return dqkv.reshape(qkv.shape), dbias.sum(axis=0)


def _per_device(fn, sharded_in, sharded_out, summed_out=()):
    """fn on each device's share of train.py's `data` axis; whole arrays without one.

    `sharded_in` / `sharded_out`: which arguments / results are split along their first
    axis; the results at `summed_out` are summed over the devices instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "data" not in mesh.axis_names or mesh.shape["data"] == 1:
        return fn

    def local(*args):
        outs = fn(*args)
        if not summed_out:
            return outs
        return tuple(jax.lax.psum(o, "data") if i in summed_out else o
                     for i, o in enumerate(outs))

    def spec(split):
        return P("data") if split else P()

    return jax.shard_map(local, mesh=mesh, in_specs=tuple(map(spec, sharded_in)),
                         out_specs=(tuple(map(spec, sharded_out)) if len(sharded_out) > 1
                                    else spec(sharded_out[0])),
                         check_vma=False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _attention(qkv, bias, mask, num_heads, interpret):
    return _attention_fwd(qkv, bias, mask, num_heads, interpret)[0]


def _attention_fwd(qkv, bias, mask, num_heads, interpret):
    forward = functools.partial(_forward, num_heads=num_heads, interpret=interpret)
    if mask is None:
        out = _per_device(lambda x, b: forward(x, b, None), (True, False), (True,))(qkv, bias)
    else:
        out = _per_device(forward, (True, False, False), (True,))(qkv, bias, mask)
    return out, (qkv, bias, mask)


def _attention_bwd(num_heads, interpret, residuals, dout):
    qkv, bias, mask = residuals
    backward = functools.partial(_backward, num_heads=num_heads, interpret=interpret)
    if mask is None:
        dqkv, dbias = _per_device(lambda x, d, b: backward(x, d, b, None),
                                  (True, True, False), (True, False), (1,))(qkv, dout, bias)
    else:
        dqkv, dbias = _per_device(backward, (True, True, False, False), (True, False),
                                  (1,))(qkv, dout, bias, mask)
    return dqkv, dbias, None  # the mask is a constant


_attention.defvjp(_attention_fwd, _attention_bwd)


def window_attention(qkv, bias, mask, *, num_heads: int, interpret: bool = False):
    """`swin.window_attention` as Pallas TPU kernels (`supported` layers only).

    qkv: [B, nW, N, 3C] (q | k | v, heads in order within each); bias: [heads, N, N],
    the relative position bias; mask: [nW, N, N] (0 / -100) or None. Returns
    [B, nW, N, C]. `interpret=True` runs the kernels' code on any platform.
    """
    return _attention(qkv, bias.astype(jnp.float32),
                      None if mask is None else mask.astype(jnp.float32), num_heads, interpret)


__all__ = ["supported", "window_attention", "windows_per_block"]

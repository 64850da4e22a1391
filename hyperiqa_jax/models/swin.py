"""Swin Transformer backbone that computes what timm's `features_only` Swin computes.

Layout is NHWC throughout. The module returns the four stage maps (no final
norm), e.g. 56x56xC0, 28x28xC1, 14x14xC2, 7x7xC3 for a 224 input. Parameter
names follow timm's (`layers_{i}/blocks_{j}/attn/qkv`, ...) so that conversion
is a rename plus transposes (see `weights_conversion/swin.py`).

Details that must match timm 1.0 (docs/models.md, "Swin details"):
- patch merging at the start of stages 1-3, 2x2 channel order
  [x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]];
- LayerNorm eps 1e-5 with the exact variance; GELU with erf;
- a block whose stage resolution is <= the window uses the whole map as its
  window and never shifts; odd blocks shift by window // 2 otherwise;
- the shift happens before padding, the -100 mask is built on the padded grid
  and padded keys are not masked.
"""

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hyperiqa_jax.models import cpu_kernels, tpu_kernels

# timm name -> architecture. Window-12 models are the 384-pixel variants.
SWIN_CONFIGS = {
    "swin_tiny_patch4_window7_224": dict(
        embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, img_size=224),
    "swin_small_patch4_window7_224": dict(
        embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7, img_size=224),
    "swin_base_patch4_window7_224": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=7, img_size=224),
    "swin_base_patch4_window12_384": dict(
        embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
        img_size=384),
    "swin_large_patch4_window7_224": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=7,
        img_size=224),
    "swin_large_patch4_window12_384": dict(
        embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12,
        img_size=384),
}

# Defaults of timm's create_model when no drop_path_rate is given.
TIMM_DEFAULT_DROP_PATH_RATE = 0.1


class LayerNorm(nn.Module):
    """LayerNorm over the last axis as timm computes it (eps 1e-5, exact variance).

    Written out rather than `nn.LayerNorm`, which multiplies 1/std by the scale
    first and so materialises a full-size [..., C] factor that the backward pass
    then keeps; here x is normalised, then scaled. Same parameters (scale, bias).
    """

    epsilon: float = 1e-5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,))
        bias = self.param("bias", nn.initializers.zeros, (features,))
        x32 = x.astype(jnp.float32)
        mean = x32.mean(axis=-1, keepdims=True)
        centred = x32 - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.epsilon) * scale + bias
        return y.astype(self.dtype)


def relative_position_index(window: tuple[int, int]) -> np.ndarray:
    """[N, N] index into the bias table: (dy + wh - 1) * (2 ww - 1) + (dx + ww - 1)."""
    wh, ww = window
    coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N]: query minus key.
    return ((rel[0] + wh - 1) * (2 * ww - 1) + rel[1] + ww - 1).astype(np.int32)


def shifted_window_mask(height: int, width: int, window: tuple[int, int],
                        shift: tuple[int, int]) -> np.ndarray:
    """[num_windows, N, N] additive mask (0 / -100) for a padded height x width map."""
    region = np.zeros((height, width), np.float32)

    def bands(size, sh):
        # Literally timm's slices; with sh == 0 the last band covers everything.
        return slice(0, -size), slice(-size, -sh), slice(-sh, None)

    label = 0
    for hs in bands(window[0], shift[0]):
        for ws in bands(window[1], shift[1]):
            region[hs, ws] = label
            label += 1
    windows = window_partition(region[None, :, :, None], window)[0, :, :, 0]  # [nW, N]
    diff = windows[:, None, :] - windows[:, :, None]
    return np.where(diff != 0, -100.0, 0.0).astype(np.float32)


def window_partition(x, window: tuple[int, int]):
    """[B, H, W, C] -> [B, num_windows, wh * ww, C], windows in row-major order."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.reshape(b, h // wh, wh, w // ww, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows, window: tuple[int, int], height: int, width: int):
    """Inverse of `window_partition`."""
    b, _, _, c = windows.shape
    wh, ww = window
    x = windows.reshape(b, height // wh, width // ww, wh, ww, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def stage_window(size: tuple[int, int], window_size: int, shifted: bool):
    """timm's per-block window and shift: a side no longer than the window is one window."""
    window = tuple(min(s, window_size) for s in size)
    shift = tuple(0 if (s <= window_size or not shifted) else window_size // 2 for s in size)
    return window, shift


def window_attention(qkv, bias, *, num_heads: int):
    """softmax(q k^T / sqrt(d) + bias) v in every window, heads concatenated.

    qkv: [B, nW, N, 3C] with rows [q | k | v], each head-major (timm's layout);
    bias: [heads, N, N] or [nW, heads, N, N] (relative position bias + shift mask).
    Returns [B, nW, N, C]. q is scaled before the product, as timm does.
    """
    b, nw, n, c3 = qkv.shape
    head_dim = c3 // (3 * num_heads)
    # [B * nW, N, 3, heads, d]: windows are the batch, tokens the sequence.
    qkv = qkv.reshape(b * nw, n, 3, num_heads, head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if bias.ndim == 3:
        bias = bias[None]
    else:  # One mask per window position, the same for every image.
        bias = jnp.broadcast_to(bias[None], (b,) + bias.shape).reshape(b * nw, *bias.shape[1:])
    out = jax.nn.dot_product_attention(q * (head_dim ** -0.5), k, v, bias=bias, scale=1.0)
    return out.reshape(b, nw, n, c3 // 3)


def patch_projection(x, kernel):
    """p x p convolution with stride p, VALID (remainder rows and columns dropped)."""
    p = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, (p, p), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


class Dense(nn.Module):
    """nn.Dense (same parameters, initialisers and numbers) whose product `kernels` picks."""

    features: int
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))

        def rows(x, kernel):  # XLA:CPU's product takes [M, K]
            y = cpu_kernels.cpu_matmul(x.reshape(-1, x.shape[-1]), kernel)
            return y.reshape(x.shape[:-1] + (self.features,))

        # Elsewhere the leading axes stay as they are: flattening [B, nW, N, C] windows
        # to rows is a copy in a TPU's tiled layouts (N = 49 is padded to 56 rows).
        y = cpu_kernels.choose(self.kernels, rows, jnp.matmul, x.astype(self.dtype),
                               kernel.astype(self.dtype))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
            y = y + bias.astype(self.dtype)
        return y


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath with scale_by_keep)."""

    rate: float

    @nn.compact
    def __call__(self, x, train: bool):
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * mask.astype(x.dtype) / keep


class WindowAttention(nn.Module):
    """Multi-head self attention inside windows, with a relative position bias."""

    dim: int
    num_heads: int
    window: tuple[int, int]
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, windows, mask=None):
        # windows: [B, num_windows, N, C]; mask: [num_windows, N, N] or None.
        n = windows.shape[2]
        wh, ww = self.window
        table = self.param(
            "relative_position_bias_table", nn.initializers.truncated_normal(0.02),
            ((2 * wh - 1) * (2 * ww - 1), self.num_heads))
        bias = table[relative_position_index(self.window).reshape(-1)]
        bias = bias.reshape(n, n, self.num_heads).transpose(2, 0, 1)  # [heads, N, N]

        qkv = Dense(3 * self.dim, dtype=self.dtype, kernels=self.kernels, name="qkv")(windows)

        def masked(attention):  # [nW, heads, N, N] in shifted blocks
            return lambda qkv, bias, mask: attention(
                qkv, bias if mask is None else bias[None] + mask[:, None],
                num_heads=self.num_heads)

        tpu = None
        if tpu_kernels.supported(self.dim, self.num_heads):
            tpu = functools.partial(tpu_kernels.window_attention, num_heads=self.num_heads)
        out = cpu_kernels.choose(self.kernels, masked(cpu_kernels.cpu_window_attention),
                                 masked(window_attention), qkv, bias, mask, tpu_fn=tpu)
        return Dense(self.dim, dtype=self.dtype, kernels=self.kernels, name="proj")(out)


def gelu(x):
    """Exact GELU as PyTorch computes it, 0.5 x (1 + erf(x / sqrt 2)): XLA's erf is far
    cheaper than the erfc that jax.nn.gelu uses."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(2 ** -0.5)).astype(x.dtype))


class Mlp(nn.Module):
    hidden_dim: int
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        out_dim = x.shape[-1]
        x = Dense(self.hidden_dim, dtype=self.dtype, kernels=self.kernels, name="fc1")(x)
        # On an accelerator the backward pass recomputes the GELU from its input rather
        # than reading a saved copy of its output, which is as large (4C per token) and
        # the step's bandwidth is what limits it; XLA:CPU keeps both.
        x = cpu_kernels.choose(self.kernels, gelu, jax.checkpoint(gelu), x)
        return Dense(out_dim, dtype=self.dtype, kernels=self.kernels, name="fc2")(x)


class SwinBlock(nn.Module):
    """(Shifted) window attention + MLP, each pre-normed with a residual.

    The residual stream keeps its own dtype (`SwinTransformer.residual_dtype`);
    the two branches compute in `dtype` and are added to it.
    """

    dim: int
    num_heads: int
    window_size: int
    shifted: bool
    mlp_ratio: float = 4.0
    drop_path: float = 0.0
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        _, h, w, _ = x.shape
        window, shift = stage_window((h, w), self.window_size, self.shifted)
        x = cpu_kernels.choose(self.kernels, cpu_kernels.materialize_grad, lambda t: t, x)

        y = LayerNorm(dtype=self.dtype, name="norm1")(x)
        if any(shift):
            y = jnp.roll(y, (-shift[0], -shift[1]), axis=(1, 2))
        pad_h, pad_w = (-h) % window[0], (-w) % window[1]
        if pad_h or pad_w:
            y = jnp.pad(y, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = h + pad_h, w + pad_w
        mask = jnp.asarray(shifted_window_mask(hp, wp, window, shift)) if any(shift) else None
        y = WindowAttention(dim=self.dim, num_heads=self.num_heads, window=window,
                            dtype=self.dtype, kernels=self.kernels,
                            name="attn")(window_partition(y, window), mask)
        y = window_reverse(y, window, hp, wp)[:, :h, :w]
        if any(shift):
            y = jnp.roll(y, shift, axis=(1, 2))
        x = x + DropPath(self.drop_path)(y, train).astype(x.dtype)

        y = LayerNorm(dtype=self.dtype, name="norm2")(x)
        y = Mlp(hidden_dim=int(self.dim * self.mlp_ratio), dtype=self.dtype, kernels=self.kernels,
                name="mlp")(y)
        return x + DropPath(self.drop_path)(y, train).astype(x.dtype)


class PatchMerging(nn.Module):
    """2x2 neighbourhood -> channels (timm order), LayerNorm(4C), bias-free Linear."""

    out_dim: int
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if h % 2 or w % 2:
            x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
            h, w = h + h % 2, w + w % 2
        # [B, H/2, dy, W/2, dx, C] -> [B, H/2, W/2, dx, dy, C]: dy varies fastest.
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5)
        x = x.reshape(b, h // 2, w // 2, 4 * c)
        x = LayerNorm(dtype=self.dtype, name="norm")(x)
        return Dense(self.out_dim, use_bias=False, dtype=self.dtype, kernels=self.kernels,
                     name="reduction")(x)


class PatchProjection(nn.Module):
    """nn.Conv with a p x p kernel and stride p, VALID: the same parameters and numbers.

    `kernels` picks the convolution or (XLA:CPU) one product of flattened patches.
    """

    features: int
    patch_size: int
    dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (p, p, x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        y = cpu_kernels.choose(self.kernels, cpu_kernels.cpu_patch_projection, patch_projection,
                               x.astype(self.dtype), kernel.astype(self.dtype))
        return y + bias.astype(self.dtype)


def space_to_depth(x, size: int):
    """[B, H, W, C] -> [B, H/size, W/size, size * size * C], each cell's pixels row-major."""
    if size == 1:
        return x
    b, h, w, c = x.shape
    x = x.reshape(b, h // size, size, w // size, size, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h // size, w // size, size * size * c)


def zero_mean_init(key, shape, dtype=jnp.float32):
    """LeCun-normal 3x3 filters with their spatial mean removed: high-pass at init."""
    kernel = nn.initializers.lecun_normal()(key, shape, dtype)
    return kernel - kernel.mean(axis=(0, 1), keepdims=True)


class PatchEmbed(nn.Module):
    """Patchify conv (+ LayerNorm), as timm; optionally behind a local-energy stem.

    The stem and `patch_norm=False` are for training from scratch on little data
    (the demo). Noise, blur and compression change the local energy of an image,
    which a linear 4x4 patch projection followed by a per-token LayerNorm does not
    expose and mean pooling does not recover. The stem squares the responses of
    `stem_channels` learnt 3x3 filters and passes them, with the pixels, to the
    patch projection; mean-pooled features then measure filter energy. timm's
    models use neither (stem_channels=0, patch_norm=True), so converted
    checkpoints are unaffected.

    `stem_stride` s > 1 evaluates the filters at every s-th pixel only (s^2
    times less stem work and memory; a sample of the energy measures it as well
    as every pixel does). The pixels are then folded s x s into channels, so
    that pixels and energies share one grid, and a patch projection of size
    patch_size / s reads both.
    """

    embed_dim: int
    patch_size: int = 4
    stem_channels: int = 0
    stem_stride: int = 1
    patch_norm: bool = True
    dtype: jnp.dtype = jnp.float32
    residual_dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        if self.stem_channels:
            s = self.stem_stride
            if p % s:
                raise ValueError(f"stem_stride {s} must divide patch_size {p}")
            responses = nn.Conv(self.stem_channels, (3, 3), strides=s, padding=1,
                                dtype=self.dtype, kernel_init=zero_mean_init, name="stem")(x)
            x = jnp.concatenate([space_to_depth(x, s), jnp.square(responses)], axis=-1)
            p //= s
        x = PatchProjection(features=self.embed_dim, patch_size=p, dtype=self.dtype,
                            kernels=self.kernels, name="proj")(x)
        if self.patch_norm:
            return LayerNorm(dtype=self.residual_dtype, name="norm")(x)
        return x.astype(self.residual_dtype)


class SwinStage(nn.Module):
    dim: int
    depth: int
    num_heads: int
    window_size: int
    downsample: bool
    drop_path: Sequence[float]
    mlp_ratio: float = 4.0
    dtype: jnp.dtype = jnp.float32
    residual_dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"
    remat: str = "none"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.downsample:
            x = PatchMerging(out_dim=self.dim, dtype=self.dtype, kernels=self.kernels,
                             name="downsample")(x)
            x = x.astype(self.residual_dtype)
        # remat="block": keep only each block's input for the backward pass and
        # recompute the rest (argument 2, `train`, is a Python bool).
        block = nn.remat(SwinBlock, static_argnums=(2,)) if self.remat == "block" else SwinBlock
        for j in range(self.depth):
            x = block(dim=self.dim, num_heads=self.num_heads, window_size=self.window_size,
                      shifted=j % 2 == 1, mlp_ratio=self.mlp_ratio,
                      drop_path=self.drop_path[j], dtype=self.dtype, kernels=self.kernels,
                      name=f"blocks_{j}")(x, train)
        return x


REMAT = ("none", "block")


class SwinTransformer(nn.Module):
    """Swin backbone returning the four NHWC stage maps (timm `features_only=True`).

    `img_size` documents the resolution the model was built for; any input whose
    sides are multiples of 32 runs, and computes what timm built with that
    `img_size` computes (smaller stage maps shrink the window, as in timm).

    Mixed precision: `dtype` is the compute dtype of the matmuls and convolutions
    (parameters stay float32); LayerNorm statistics and the attention softmax are
    float32 whatever it is, and the residual stream between the branches (and so
    the stage maps) is `residual_dtype`, float32 by default (docs/models.md).
    `kernels` picks the implementation of four operations (models/cpu_kernels.py);
    `remat="block"` recomputes each block's activations in the backward pass.
    """

    embed_dim: int = 96
    depths: Sequence[int] = (2, 2, 6, 2)
    num_heads: Sequence[int] = (3, 6, 12, 24)
    window_size: int = 7
    patch_size: int = 4
    stem_channels: int = 0  # > 0: a local-energy stem of this many 3x3 filters (not in timm).
    stem_stride: int = 1    # the stem's filters at every stem_stride-th pixel (PatchEmbed).
    patch_norm: bool = True  # LayerNorm after the patch embedding (timm: always).
    mlp_ratio: float = 4.0
    drop_path_rate: float = TIMM_DEFAULT_DROP_PATH_RATE
    img_size: int = 224
    dtype: jnp.dtype = jnp.float32
    residual_dtype: jnp.dtype = jnp.float32
    kernels: str = "auto"  # "auto", "cpu" or "generic" (models/cpu_kernels.py).
    remat: str = "none"    # "none" or "block".

    @property
    def stage_channels(self) -> tuple[int, ...]:
        return tuple(self.embed_dim * 2 ** i for i in range(len(self.depths)))

    def drop_path_rates(self) -> list[list[float]]:
        """Linear in the block index over all blocks, 0 to drop_path_rate (timm)."""
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths)).tolist()
        bounds = np.cumsum((0,) + tuple(self.depths))
        return [rates[bounds[i]:bounds[i + 1]] for i in range(len(self.depths))]

    @nn.compact
    def __call__(self, images, train: bool = False) -> tuple[jax.Array, ...]:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC RGB images, got shape {images.shape}")
        if self.remat not in REMAT:
            raise ValueError(f"remat must be one of {REMAT}, got {self.remat!r}")
        x = PatchEmbed(embed_dim=self.embed_dim, patch_size=self.patch_size,
                       stem_channels=self.stem_channels, stem_stride=self.stem_stride,
                       patch_norm=self.patch_norm,
                       dtype=self.dtype, residual_dtype=self.residual_dtype, kernels=self.kernels,
                       name="patch_embed")(images.astype(self.dtype))
        features = []
        for i, (dim, depth, heads, rates) in enumerate(zip(
                self.stage_channels, self.depths, self.num_heads, self.drop_path_rates())):
            x = SwinStage(dim=dim, depth=depth, num_heads=heads, window_size=self.window_size,
                          downsample=i > 0,
                          drop_path=tuple(rates), mlp_ratio=self.mlp_ratio, dtype=self.dtype,
                          residual_dtype=self.residual_dtype, kernels=self.kernels,
                          remat=self.remat, name=f"layers_{i}")(x, train)
            features.append(x)
        return tuple(features)


def swin_from_name(name: str, **overrides) -> SwinTransformer:
    """A SwinTransformer for a timm model name, e.g. `swin_base_patch4_window7_224`.

    Keyword overrides replace architecture fields (embed_dim, depths, num_heads,
    window_size, drop_path_rate, img_size, dtype, ...). `dtype` may be a string.
    """
    if name not in SWIN_CONFIGS:
        raise ValueError(f"unknown Swin model {name!r}; known: {', '.join(SWIN_CONFIGS)}")
    fields = dict(SWIN_CONFIGS[name])
    unknown = set(overrides) - {f.name for f in dataclasses.fields(SwinTransformer)}
    if unknown:
        raise ValueError(f"unknown SwinTransformer field(s) {sorted(unknown)}")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("dtype", "residual_dtype"):
        if isinstance(fields.get(key), str):
            fields[key] = jnp.dtype(fields[key])
    for key in ("depths", "num_heads"):
        fields[key] = tuple(fields[key])
    return SwinTransformer(**fields)

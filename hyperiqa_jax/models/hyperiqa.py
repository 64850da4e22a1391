"""HyperIQA head (docs/models.md): LDA vector, multi-scale fusion, attention, hyper network,
and a per-image target network.

    backbone stage maps ─┬─ LDA ────────────────────────────────► target_in_vec [224]
                         └─ pool to 7x7 ─ (attention) ─ concat ─ hyper network
                                                                  │ generated weights/biases
                                               target net (vmapped over images) ◄┘ ─► score

Everything is NHWC. Wherever the PyTorch model flattens or views an NCHW
tensor (LDA flatten, generated target weights), the map is transposed to NCHW
first so that converted checkpoints compute the same thing.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

ATTENTIONS = ("channel", "scale", "none")


def nchw_flatten(x):
    """[B, H, W, C] -> [B, C*H*W] in PyTorch's `x.view(B, -1)` order on NCHW."""
    return x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)


def _adaptive_pool_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] averaging weights of PyTorch's adaptive_avg_pool along one axis."""
    matrix = np.zeros((out_size, in_size), np.float32)
    for i in range(out_size):
        start = (i * in_size) // out_size
        end = -((-(i + 1) * in_size) // out_size)  # ceil((i + 1) * in / out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def mean_pool(x, window: tuple[int, int]):
    """Non-overlapping average pooling, VALID (floor) like PyTorch's AvgPool2d.

    A reshape and mean rather than `nn.avg_pool`: XLA:CPU runs reduce-window
    and its gradient far slower than a plain reduction.
    """
    b, h, w, c = x.shape
    wh, ww = window
    oh, ow = h // wh, w // ww
    x = x[:, :oh * wh, :ow * ww]
    return x.reshape(b, oh, wh, ow, ww, c).mean(axis=(2, 4))


def adaptive_avg_pool(x, output_size: tuple[int, int]):
    """PyTorch `adaptive_avg_pool2d` on an NHWC map, also for sizes that do not divide.

    Output cell i covers input [floor(i*n/o), ceil((i+1)*n/o)); windows may overlap.
    """
    _, h, w, _ = x.shape
    oh, ow = output_size
    if (h, w) == (oh, ow):
        return x
    if h % oh == 0 and w % ow == 0:  # plain average pooling, as PyTorch computes it.
        return mean_pool(x, (h // oh, w // ow))
    rows = jnp.asarray(_adaptive_pool_matrix(h, oh), x.dtype)
    cols = jnp.asarray(_adaptive_pool_matrix(w, ow), x.dtype)
    return jnp.einsum("ih,bhwc,jw->bijc", rows, x, cols)


class LocalDistortionAware(nn.Module):
    """LDA: per stage 1x1 conv (stages 0-2), avg-pool 7/7, NCHW flatten, Linear; concat."""

    conv_widths: Sequence[int] = (16, 32, 64)
    out_sizes: Sequence[int] = (16, 16, 16, 176)
    pool: int = 7
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, stage_maps):
        parts = []
        for i, (x, out_size) in enumerate(zip(stage_maps, self.out_sizes)):
            if i < len(self.conv_widths):
                x = nn.Conv(self.conv_widths[i], (1, 1), use_bias=False, dtype=self.dtype,
                            name=f"conv_{i}")(x)
            # PyTorch AvgPool2d(7, stride=7) floors, like VALID padding.
            x = mean_pool(x, (self.pool, self.pool))
            parts.append(nn.Dense(out_size, dtype=self.dtype, name=f"fc_{i}")(nchw_flatten(x)))
        return jnp.concatenate(parts, axis=-1)


class ChannelAttention(nn.Module):
    """Squeeze-excitation over the fused channels (the PyTorch original's E6 design).

    `gate_bias` is the initial bias of the `expand` layer, i.e. the gate's logit
    before the squeezed features move it: 0 (the default, as in PyTorch) starts
    the gate at sigmoid(0) = 0.5, which halves the fused features; training from
    scratch (the demo) starts it near identity instead, e.g. 3 -> sigmoid 0.95.
    Only the initial value changes; the parameters and the computation do not.
    """

    reduction: int = 4
    gate_bias: float = 0.0
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        channels = x.shape[-1]
        squeezed = x.mean(axis=(1, 2))
        hidden = nn.relu(nn.Dense(channels // self.reduction, dtype=self.dtype,
                                  name="reduce")(squeezed))
        expand = nn.Dense(channels, dtype=self.dtype,
                          bias_init=nn.initializers.constant(self.gate_bias), name="expand")
        weights = nn.sigmoid(expand(hidden).astype(jnp.float32))
        return x * weights[:, None, None, :].astype(x.dtype), weights


class ScaleAttention(nn.Module):
    """Softmax weights over the stages from the deepest map's global average (SMART-IQA)."""

    hidden: int = 256
    dropout_rate: float = 0.5
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pooled_maps, deepest_map, train: bool):
        context = deepest_map.mean(axis=(1, 2))
        hidden = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(context))
        hidden = nn.Dropout(self.dropout_rate)(hidden, deterministic=not train)
        logits = nn.Dense(len(pooled_maps), dtype=self.dtype, name="logits")(hidden)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        fused = jnp.concatenate(
            [m * weights[:, i, None, None, None].astype(m.dtype)
             for i, m in enumerate(pooled_maps)], axis=-1)
        return fused, weights


class HyperNetwork(nn.Module):
    """1x1 conv stack -> hyper_in_feat; heads that generate the target net's weights/biases.

    Weight i comes from a 3x3 conv whose [C', 7, 7] (NCHW) output is viewed row-major
    as [out_i, in_i]; biases (and fc5's weight) from Linear layers on the global average.

    `small_target_init` (training from scratch, the demo) only changes the initial
    values: with the default init the generated weights are ~5x larger than
    1/sqrt(fan_in), the target net's sigmoids saturate and its input (the LDA
    vector) gets no gradient. Instead the generated hidden weights start at
    std ~1/sqrt(fan_in) and the output layer's generated weight at zero, so the
    score starts as a linear read-out of the pooled hyper features and the
    per-image target net grows in as that weight is learnt.
    """

    feature_widths: Sequence[int] = (512, 256)
    hyper_in_channels: int = 112
    target_in_size: int = 224
    target_fc_sizes: Sequence[int] = (112, 56, 28, 14)
    feature_size: int = 7
    dropout_rate: float = 0.0
    small_target_init: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, fused, train: bool):
        x = fused
        for i, width in enumerate((*self.feature_widths, self.hyper_in_channels)):
            x = nn.relu(nn.Conv(width, (1, 1), dtype=self.dtype, name=f"feature_conv_{i}")(x))
        hyper_in_feat = x
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
        pooled = x.mean(axis=(1, 2))

        batch = x.shape[0]
        sizes = (self.target_in_size, *self.target_fc_sizes)
        weights, biases = [], []
        for i in range(len(self.target_fc_sizes)):
            fan_in, fan_out = sizes[i], sizes[i + 1]
            channels, remainder = divmod(fan_in * fan_out, self.feature_size ** 2)
            if remainder:
                raise ValueError(f"target fc{i + 1} ({fan_out}x{fan_in}) is not divisible by "
                                 f"feature_size**2 = {self.feature_size ** 2}")
            # LeCun scales by the conv's own fan-in; a further 1/fan_in of the target
            # layer makes the generated weights ~1/sqrt(fan_in) for unit-size features.
            init = nn.initializers.variance_scaling(
                1.0 / fan_in if self.small_target_init else 1.0, "fan_in", "truncated_normal")
            w = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), kernel_init=init,
                        dtype=self.dtype, name=f"fc{i + 1}_weight_conv")(x)
            weights.append(nchw_flatten(w).reshape(batch, fan_out, fan_in))
            biases.append(nn.Dense(fan_out, dtype=self.dtype, name=f"fc{i + 1}_bias_fc")(pooled))
        last = len(self.target_fc_sizes) + 1
        init = nn.initializers.zeros if self.small_target_init else nn.initializers.lecun_normal()
        weights.append(nn.Dense(sizes[-1], kernel_init=init, dtype=self.dtype,
                                name=f"fc{last}_weight_fc")(pooled)
                       .reshape(batch, 1, sizes[-1]))
        biases.append(nn.Dense(1, dtype=self.dtype, name=f"fc{last}_bias_fc")(pooled))
        return hyper_in_feat, weights, biases


class TargetNetwork(nn.Module):
    """The quality regressor of ONE image, with weights generated for that image.

    q = sigmoid(W_i q + b_i) with dropout after every hidden layer but the last;
    score = W_5 q + b_5.
    """

    dropout_rate: float = 0.0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x, weights, biases):
        q = x
        hidden_layers = len(weights) - 1
        for i in range(hidden_layers):
            q = nn.sigmoid(weights[i] @ q + biases[i])
            if i < hidden_layers - 1:
                q = nn.Dropout(self.dropout_rate)(q, deterministic=self.deterministic)
        return (weights[-1] @ q + biases[-1])[0]


# One TargetNetwork per image: weights, biases and the dropout rng are split over the batch.
BatchedTargetNetwork = nn.vmap(
    TargetNetwork, in_axes=0, out_axes=0, variable_axes={}, split_rngs={"dropout": True})


class HyperIQA(nn.Module):
    """Backbone + HyperIQA head. See `hyperiqa_jax.models.build_model` for the config mapping.

    `__call__(images, train, return_intermediates)` takes ImageNet-normalised NHWC
    images and returns {'score': [B] float32, 'attention': [B, C] / [B, 4] / None}
    plus, with return_intermediates, 'stage_maps', 'pooled_maps', 'target_in_vec',
    'fused', 'hyper_in_feat', 'target_fc{i}_weight' [B, out, in], 'target_fc{i}_bias' [B, out].
    """

    backbone: nn.Module
    multi_scale: bool = True
    attention: str = "channel"
    hyper_feature_widths: Sequence[int] = (512, 256)
    hyper_in_channels: int = 112
    target_in_size: int = 224
    target_fc_sizes: Sequence[int] = (112, 56, 28, 14)
    feature_size: int = 7
    lda_conv_widths: Sequence[int] = (16, 32, 64)
    lda_out_size: int = 16
    dropout: float = 0.0
    attention_reduction: int = 4
    attention_hidden: int = 256
    attention_dropout: float = 0.5
    attention_gate_bias: float = 0.0
    small_target_init: bool = False
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images, train: bool = False, return_intermediates: bool = False):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.attention == "scale" and not self.multi_scale:
            raise ValueError("scale attention weighs the four stages: it needs multi_scale=True")
        stage_maps = tuple(self.backbone(images, train=train))

        lda_sizes = [self.lda_out_size] * len(self.lda_conv_widths)
        lda_sizes.append(self.target_in_size - sum(lda_sizes))
        target_in_vec = LocalDistortionAware(
            conv_widths=self.lda_conv_widths, out_sizes=tuple(lda_sizes), dtype=self.dtype,
            name="lda")(stage_maps)

        size = (self.feature_size, self.feature_size)
        used = stage_maps if self.multi_scale else stage_maps[-1:]
        pooled_maps = [adaptive_avg_pool(m, size) for m in used]
        attention = None
        if self.attention == "scale":
            fused, attention = ScaleAttention(
                hidden=self.attention_hidden, dropout_rate=self.attention_dropout,
                dtype=self.dtype, name="attention")(pooled_maps, stage_maps[-1], train)
        else:
            fused = jnp.concatenate(pooled_maps, axis=-1)
            if self.attention == "channel":
                fused, attention = ChannelAttention(
                    reduction=self.attention_reduction, gate_bias=self.attention_gate_bias,
                    dtype=self.dtype, name="attention")(fused)

        hyper_in_feat, weights, biases = HyperNetwork(
            feature_widths=self.hyper_feature_widths, hyper_in_channels=self.hyper_in_channels,
            target_in_size=self.target_in_size, target_fc_sizes=tuple(self.target_fc_sizes),
            feature_size=self.feature_size, dropout_rate=self.dropout,
            small_target_init=self.small_target_init, dtype=self.dtype, name="hyper")(fused, train)

        # The target net is tiny: run it in float32 so the score keeps its precision.
        to32 = lambda xs: [v.astype(jnp.float32) for v in xs]
        score = BatchedTargetNetwork(dropout_rate=self.dropout, deterministic=not train,
                                     name="target")(
            target_in_vec.astype(jnp.float32), to32(weights), to32(biases))

        out = {"score": score.astype(jnp.float32), "attention": attention}
        if return_intermediates:
            out.update(stage_maps=stage_maps, pooled_maps=tuple(pooled_maps),
                       target_in_vec=target_in_vec, fused=fused, hyper_in_feat=hyper_in_feat)
            for i, (w, b) in enumerate(zip(weights, biases)):
                out[f"target_fc{i + 1}_weight"] = w
                out[f"target_fc{i + 1}_bias"] = b
        return out

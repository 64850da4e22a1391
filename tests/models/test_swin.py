"""The JAX Swin against timm's features_only Swin (float32, seeded random weights)."""

import collections
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from hyperiqa_jax import lowering
from hyperiqa_jax.models import cpu_kernels, swin
from weights_conversion.parity_limits import difference, intermediate_limit, swin_stage_limit
from weights_conversion.validate_parity import swin_parity


def _param_count(model, size=224):
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes["params"]))


@pytest.mark.parametrize("kernels", ["cpu", "generic"])
@pytest.mark.parametrize("name,img_size", [
    ("swin_tiny_patch4_window7_224", 224),
    ("swin_base_patch4_window7_224", 224),
    ("swin_tiny_patch4_window7_224", 256),  # stage 3 is 8x8: shifted, padded windows.
    ("swin_tiny_patch4_window7_224", 192),  # stage 3 is 6x6: window shrinks to the map.
])
def test_stage_maps_match_timm(name, img_size, kernels):
    results = swin_parity(name, batch=1 if "base" in name else 2, img_size=img_size,
                          kernels=kernels)
    assert set(results) == {"stage0", "stage1", "stage2", "stage3"}
    for stage, diff in results.items():
        assert diff["ref_max_abs"] > 1.0, f"{stage}: reference output is degenerate"
        assert diff["max_abs"] <= swin_stage_limit(diff["ref_max_abs"]), (stage, diff)


@pytest.mark.parametrize("name,count", [
    ("swin_tiny_patch4_window7_224", 27_517_818),
    ("swin_small_patch4_window7_224", 48_835_722),
    ("swin_base_patch4_window7_224", 86_741_176),
])
def test_parameter_counts_equal_timm_features_only(name, count):
    assert _param_count(swin.swin_from_name(name)) == count


def test_stage_shapes():
    model = swin.swin_from_name("swin_tiny_patch4_window7_224")
    out = jax.eval_shape(lambda: model.init_with_output(
        jax.random.key(0), jnp.zeros((2, 224, 224, 3)))[0])
    assert [o.shape for o in out] == [(2, 56, 56, 96), (2, 28, 28, 192), (2, 14, 14, 384),
                                      (2, 7, 7, 768)]


def _small_swin(**kw):
    fields = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4)) | kw
    return swin.swin_from_name("swin_tiny_patch4_window7_224", **fields)


def _within_binomial_bound(kept, trials, rate):
    """Kept count of `trials` samples each kept with probability 1 - rate, within 4 standard
    deviations of its mean (a correct layer fails this with probability ~6e-5; the keys are
    fixed, so the test is deterministic)."""
    mean, std = trials * (1 - rate), math.sqrt(trials * rate * (1 - rate))
    return abs(kept - mean) <= 4 * std


def _scaled_by_keep(out, branch, rate):
    """Per sample: out == branch / (1 - rate), within float32 rounding (measured: at most
    7.9e-8 relative to the float64 quotient, under one float32 ulp; allowed: 5e-7)."""
    want = branch.astype(np.float64) / (1 - rate)
    return np.all(np.abs(out - want) <= 5e-7 * np.abs(want), axis=tuple(range(1, out.ndim)))


def test_drop_path_drops_whole_samples_at_its_rate():
    """timm's DropPath (scale_by_keep): in training each sample's branch is either zeroed or
    scaled by 1 / (1 - p) as a whole; the kept fraction is 1 - p; in eval, identity."""
    rate, n = 0.3, 20_000
    x = jax.random.normal(jax.random.key(0), (n, 3, 4, 5))
    layer = swin.DropPath(rate)
    y = np.asarray(layer.apply({}, x, True, rngs={"dropout": jax.random.key(1)}))
    x = np.asarray(x)
    zeroed = np.all(y == 0, axis=(1, 2, 3))
    scaled = _scaled_by_keep(y, x, rate)
    assert np.all(zeroed ^ scaled)  # whole samples: never part of one
    assert _within_binomial_bound(scaled.sum(), n, rate), scaled.mean()
    other = np.asarray(layer.apply({}, x, True, rngs={"dropout": jax.random.key(2)}))
    assert not np.array_equal(np.all(other == 0, axis=(1, 2, 3)), zeroed)  # a new key, a new mask
    assert layer.apply({}, x, False) is x  # eval: identity, no key needed
    assert swin.DropPath(0.0).apply({}, x, True) is x


def _drop_path_calls(model, params, x, **kwargs):
    """(rate, branch in, branch out) of every DropPath call of one (jitted) forward pass."""
    rates = []

    def forward(params, x):
        branches = []

        def record(next_fun, args, call_kwargs, context):
            out = next_fun(*args, **call_kwargs)
            if isinstance(context.module, swin.DropPath) and context.method_name == "__call__":
                rates.append(context.module.rate)
                branches.append((args[0], out))
            return out

        with nn.intercept_methods(record):
            model.apply({"params": params}, x, **kwargs)
        return branches

    branches = jax.jit(forward)(params, x)
    return [(rate, np.asarray(b), np.asarray(o)) for rate, (b, o) in zip(rates, branches)]


def test_drop_path_in_the_model_per_sample_at_each_blocks_rate():
    # Blocks' rates 0, 0.125, 0.25, 0.375, 0.5 (linear over the 5 blocks); 2 branches each.
    model = _small_swin(drop_path_rate=0.5, img_size=32)
    n = 128
    x = jax.random.normal(jax.random.key(1), (n, 32, 32, 3))
    # Random weights without `init` (its random number graph compiles slowly).
    shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32), shapes)
    calls = _drop_path_calls(model, params, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert [rate for rate, _, _ in calls] == [r for stage in model.drop_path_rates()
                                              for r in stage for _ in range(2)]
    kept = collections.Counter()
    for rate, branch, out in calls:
        if rate == 0.0:
            assert np.array_equal(out, branch)
            continue
        zeroed = np.all(out == 0, axis=(1, 2, 3))
        scaled = _scaled_by_keep(out, branch, rate)
        assert np.all(zeroed ^ scaled), rate  # each sample dropped or kept as a whole
        kept[rate] += scaled.sum()
    for rate, count in kept.items():  # 2 branches x n samples per rate
        assert _within_binomial_bound(count, 2 * n, rate), (rate, count)
    # Eval: every branch passes unchanged, with or without a key.
    for _, branch, out in _drop_path_calls(model, params, x[:4]):
        assert np.array_equal(out, branch)


def test_drop_path_rates_are_linear_over_blocks():
    model = swin.swin_from_name("swin_tiny_patch4_window7_224", drop_path_rate=0.2)
    flat = [r for stage in model.drop_path_rates() for r in stage]
    np.testing.assert_allclose(flat, np.linspace(0, 0.2, 12))


@pytest.mark.parametrize("residual_dtype", ["float32", "bfloat16"])
def test_bfloat16_close_to_float32(residual_dtype):
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    model32 = _small_swin(img_size=64)
    model16 = _small_swin(img_size=64, dtype="bfloat16", residual_dtype=residual_dtype)
    params = model32.init(jax.random.key(0), x)["params"]
    out32 = model32.apply({"params": params}, x)
    out16 = model16.apply({"params": params}, x)
    for a, b in zip(out32, out16):
        assert b.dtype == jnp.dtype(residual_dtype)  # the residual stream's dtype.
        rel = np.linalg.norm(np.float32(b) - a) / np.linalg.norm(a)
        # bfloat16 keeps 8 significant bits (relative rounding 2**-9 per operation).
        assert rel < 0.05, rel
    assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))


def test_unknown_name_and_field_are_clear_errors():
    with pytest.raises(ValueError, match="unknown Swin model"):
        swin.swin_from_name("swin_huge")
    with pytest.raises(ValueError, match="unknown SwinTransformer field"):
        swin.swin_from_name("swin_tiny_patch4_window7_224", embed=3)


def test_shifted_window_mask_matches_closed_form():
    # 14x14 map, window 7, shift 3: the top-left window is one region (all zeros), the
    # bottom-right window mixes 4 regions; tokens of different regions get -100.
    mask = swin.shifted_window_mask(14, 14, (7, 7), (3, 3))
    assert mask.shape == (4, 49, 49)
    assert (mask[0] == 0).all()
    rows = np.arange(7)[:, None].repeat(7, 1).reshape(-1) >= 4
    cols = np.arange(7)[None, :].repeat(7, 0).reshape(-1) >= 4
    region = rows * 2 + cols
    np.testing.assert_array_equal(mask[3], np.where(region[:, None] == region[None], 0, -100))


def test_layer_norm_and_gelu_match_pytorch():
    import torch

    rng = np.random.RandomState(0)
    x = (rng.randn(2, 5, 7, 16) * 3 + 1).astype(np.float32)
    scale, bias = rng.randn(16).astype(np.float32), rng.randn(16).astype(np.float32)
    got = swin.LayerNorm().apply({"params": {"scale": scale, "bias": bias}}, jnp.asarray(x))
    expected = torch.nn.functional.layer_norm(torch.from_numpy(x), (16,), torch.from_numpy(scale),
                                              torch.from_numpy(bias), eps=1e-5)
    np.testing.assert_allclose(np.asarray(got), expected.numpy(), atol=2e-5)

    mlp = swin.Mlp(hidden_dim=16)
    params = mlp.init(jax.random.key(0), jnp.asarray(x))["params"]
    hidden = jnp.asarray(x) @ params["fc1"]["kernel"] + params["fc1"]["bias"]
    got_gelu = (mlp.apply({"params": params}, jnp.asarray(x)) - params["fc2"]["bias"])
    expected_gelu = torch.nn.functional.gelu(torch.from_numpy(np.asarray(hidden))).numpy()
    np.testing.assert_allclose(np.asarray(got_gelu),
                               expected_gelu @ np.asarray(params["fc2"]["kernel"]), atol=1e-4)


def _torch_conv(t, p, stride, padding):
    """torch's conv2d with a flax conv's parameters (HWIO kernel -> OIHW; copied, so torch
    gets writable arrays)."""
    import torch

    w = torch.from_numpy(np.array(p["kernel"]).transpose(3, 2, 0, 1))
    b = torch.from_numpy(np.array(p["bias"]))
    return torch.nn.functional.conv2d(t, w, b, stride=stride, padding=padding)


def test_energy_stem_and_no_patch_norm_match_pytorch():
    import torch

    x = np.random.RandomState(1).randn(2, 16, 16, 3).astype(np.float32)
    embed = swin.PatchEmbed(embed_dim=8, patch_size=4, stem_channels=6, patch_norm=False)
    params = embed.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert set(params) == {"stem", "proj"}  # no LayerNorm
    got = embed.apply({"params": params}, jnp.asarray(x))

    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    t = torch.cat([t, _torch_conv(t, params["stem"], 1, 1) ** 2], dim=1)  # pixels + filter energy
    expected = _torch_conv(t, params["proj"], 4, 0).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5)  # measured <= 1.2e-6
    # Its filters start zero-mean (high-pass): a flat image gives no filter energy
    # (away from the border, where the zero padding is an edge).
    np.testing.assert_allclose(np.asarray(params["stem"]["kernel"]).sum(axis=(0, 1)), 0, atol=3e-6)
    flat = jnp.full((1, 16, 16, 3), 0.7)
    proj = params["proj"]
    pixels_only = {"proj": {"kernel": proj["kernel"][:, :, :3], "bias": proj["bias"]}}
    got_flat = embed.apply({"params": params}, flat)
    expected_flat = swin.PatchEmbed(8, 4, patch_norm=False).apply({"params": pixels_only}, flat)
    np.testing.assert_allclose(np.asarray(got_flat)[:, 1:-1, 1:-1],
                               np.asarray(expected_flat)[:, 1:-1, 1:-1], atol=1e-5)
    # The defaults are timm's patch embedding: no stem, a LayerNorm.
    default = swin.PatchEmbed(embed_dim=8).init(jax.random.key(0), jnp.asarray(x))["params"]
    assert set(default) == {"proj", "norm"}


def test_strided_energy_stem_matches_pytorch():
    """stem_stride 2: filters at even pixels, pixels folded 2 x 2 into channels, 2 x 2 patches."""
    import torch

    x = np.random.RandomState(2).randn(2, 16, 16, 3).astype(np.float32)
    embed = swin.PatchEmbed(embed_dim=8, patch_size=4, stem_channels=6, stem_stride=2,
                            patch_norm=False)
    params = embed.init(jax.random.key(0), jnp.asarray(x))["params"]
    assert params["proj"]["kernel"].shape == (2, 2, 4 * 3 + 6, 8)
    got = embed.apply({"params": params}, jnp.asarray(x))

    t = torch.from_numpy(x.transpose(0, 3, 1, 2))
    # Each 2 x 2 cell's pixels as channels in (row, column, colour) order.
    cells = t.reshape(2, 3, 8, 2, 8, 2).permute(0, 3, 5, 1, 2, 4).reshape(2, 12, 8, 8)
    t = torch.cat([cells, _torch_conv(t, params["stem"], 2, 1) ** 2], dim=1)
    expected = _torch_conv(t, params["proj"], 2, 0).numpy().transpose(0, 2, 3, 1)
    diff = difference(got, expected)
    assert diff["max_abs"] <= intermediate_limit(diff["ref_max_abs"]), diff
    with pytest.raises(ValueError, match="stem_stride 3 must divide patch_size 4"):
        swin.PatchEmbed(embed_dim=8, stem_channels=6, stem_stride=3).init(
            jax.random.key(0), jnp.asarray(x))


def test_materialize_grad_is_the_identity_for_values_and_gradients():
    x = jnp.asarray(np.random.RandomState(0).randn(3, 4), jnp.float32)
    f = lambda v: jnp.sum(jnp.sin(v) * v)
    np.testing.assert_array_equal(cpu_kernels.materialize_grad(x), x)
    np.testing.assert_array_equal(jax.grad(lambda v: f(cpu_kernels.materialize_grad(v)))(x),
                                  jax.grad(f)(x))
    # A NaN in the incoming gradient's first element makes the whole gradient NaN.
    g = jax.vjp(cpu_kernels.materialize_grad, x)[1](x.at[0, 0].set(jnp.nan))[0]
    assert bool(jnp.isnan(g).all())


def _plain_attention(q, k, v, bias):
    """The formula, head-major [B, nW, heads, N, d], left to autodiff."""
    weights = jax.nn.softmax(jnp.einsum("bwhqd,bwhkd->bwhqk", q, k) + bias, axis=-1)
    return jnp.einsum("bwhqk,bwhkd->bwhqd", weights, v)


@pytest.mark.parametrize("bias_shape", [(3, 49, 49), (4, 3, 49, 49)])
def test_window_attention_core_gradient_matches_autodiff(bias_shape):
    # The CPU path's hand-written backward pass against JAX's autodiff of the same formula.
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, dout = (jax.random.normal(keys[i], (2, 4, 3, 49, 8)) for i in range(4))
    bias = jax.random.normal(keys[4], bias_shape)

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args) * dout)

    core = cpu_kernels.window_attention_core
    got = jax.grad(loss(core), argnums=(0, 1, 2, 3))(q, k, v, bias)
    want = jax.grad(loss(_plain_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    np.testing.assert_allclose(core(q, k, v, bias), _plain_attention(q, k, v, bias),
                               rtol=1e-6, atol=1e-6)
    for g, w in zip(got, want):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=5e-5, atol=5e-5)  # measured <= 4.5e-6


@pytest.mark.parametrize("bias_shape", [(3, 49, 49), (4, 3, 49, 49)])
def test_window_attention_paths_match_the_formula(bias_shape):
    # Both implementations of swin's window attention (the accelerator one on
    # jax.nn.dot_product_attention, the CPU one head-major) take timm's qkv layout
    # [B, nW, N, 3C]: against the formula on the explicitly split heads, values and
    # gradients (qkv and the bias, which carries the trainable position table).
    heads, d = 3, 8
    keys = jax.random.split(jax.random.key(0), 3)
    qkv = jax.random.normal(keys[0], (2, 4, 49, 3 * heads * d))
    bias = jax.random.normal(keys[1], bias_shape)
    dout = jax.random.normal(keys[2], (2, 4, 49, heads * d))

    def formula(qkv, bias):
        q, k, v = (t.reshape(2, 4, 49, heads, d).transpose(0, 1, 3, 2, 4)
                   for t in jnp.split(qkv, 3, axis=-1))
        out = _plain_attention(q * d ** -0.5, k, v, bias)
        return out.transpose(0, 1, 3, 2, 4).reshape(2, 4, 49, heads * d)

    def value_and_grads(attention):
        grads = jax.grad(lambda *a: jnp.sum(attention(*a) * dout), argnums=(0, 1))(qkv, bias)
        return attention(qkv, bias), grads

    want, want_grads = value_and_grads(formula)
    for fn in (swin.window_attention, cpu_kernels.cpu_window_attention):
        got, grads = value_and_grads(functools.partial(fn, num_heads=heads))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
        for g, w in zip(grads, want_grads):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernels", ["cpu", "generic"])
@pytest.mark.parametrize("in_features,out_features", [(8, 24), (24, 8)])
def test_dense_matches_flax_dense_values_and_gradients(in_features, out_features, kernels):
    # Both branches of the CPU weight gradient (transpose x, or transpose dy) and the
    # plain product against flax's nn.Dense under autodiff, with the same parameters.
    x = jax.random.normal(jax.random.key(1), (2, 5, in_features))
    dy = jax.random.normal(jax.random.key(2), (2, 5, out_features))
    ours, theirs = swin.Dense(out_features, kernels=kernels), nn.Dense(out_features)
    params = ours.init(jax.random.key(0), x)
    flax_params = theirs.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, flax_params)

    def loss(module):
        return lambda p, x: jnp.sum(module.apply(p, x) * dy)

    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6)
    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(theirs), argnums=(0, 1))(params, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6), got, want)


@pytest.mark.parametrize("kernels", ["cpu", "generic"])
@pytest.mark.parametrize("height,width", [(16, 12), (18, 13)])
def test_patch_projection_matches_strided_conv(height, width, kernels):
    # Same parameters and numbers as the p x p, stride p, VALID nn.Conv, also where
    # the sides are not multiples of p (the remainder is dropped).
    x = jax.random.normal(jax.random.key(1), (2, height, width, 5))
    ours = swin.PatchProjection(features=7, patch_size=4, kernels=kernels)
    conv = nn.Conv(7, (4, 4), strides=(4, 4), padding="VALID")
    params = ours.init(jax.random.key(0), x)
    jax.tree.map(np.testing.assert_array_equal, params, conv.init(jax.random.key(0), x))
    np.testing.assert_allclose(ours.apply(params, x), conv.apply(params, x), rtol=3e-5, atol=3e-6)

    def loss(module):
        return lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))

    got = jax.grad(loss(ours), argnums=(0, 1))(params, x)
    want = jax.grad(loss(conv), argnums=(0, 1))(params, x)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=3e-5, atol=3e-5), got, want)


def _stage_maps_and_grads(model, params, x):
    def loss(p):  # Every stage contributes, through a nonlinearity.
        return sum(jnp.sum(jnp.sin(m)) for m in model.apply({"params": p}, x))

    return jax.jit(lambda p: (model.apply({"params": p}, x), jax.grad(loss)(p)))(params)


def test_cpu_kernels_compute_what_plain_autodiff_computes():
    # The whole backbone with each kernel choice; "generic" is plain JAX and plain
    # autodiff. A 64-pixel input gives 16/8/4/2 maps: stages 0 and 1 have shifted,
    # padded windows, stages 2 and 3 shrink the window to the map. (On this CPU
    # "auto" lowers to exactly the CPU path: test_lowering.py.)
    x = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
    models = {k: _small_swin(img_size=64, depths=(2, 2, 1, 1), kernels=k)
              for k in ("cpu", "generic")}
    params = models["generic"].init(jax.random.key(0), x)["params"]
    (got_maps, got_grads), (maps, grads) = (
        _stage_maps_and_grads(models[k], params, x) for k in ("cpu", "generic"))
    for got, want in zip(got_maps, maps):  # measured: <= 3.1e-6 apart.
        np.testing.assert_allclose(got, want, rtol=3e-5, atol=3e-5)
    want_grads = traverse_util.flatten_dict(grads)
    for path, g in traverse_util.flatten_dict(got_grads).items():
        # Float rounding of differently ordered sums: measured <= 1.5e-6.
        rel = float(jnp.linalg.norm(g - want_grads[path]) / jnp.linalg.norm(want_grads[path]))
        assert rel < 2e-5, (path, rel)


def test_block_remat_changes_memory_not_numbers():
    x = jax.random.normal(jax.random.key(1), (4, 64, 64, 3))
    plain, remat = (_small_swin(img_size=64, depths=(2, 2, 1, 1), drop_path_rate=0.2,
                                kernels="generic", remat=r) for r in ("none", "block"))
    params = plain.init(jax.random.key(0), x)["params"]

    def grads(model):
        def loss(p):
            maps = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(4)})
            return sum(jnp.sum(jnp.sin(m)) for m in maps)
        return jax.jit(jax.grad(loss))

    # Compiled as an accelerator would keep remat's barriers (lowering.KEEP_REMAT_BARRIERS).
    compiled = {m.remat: grads(m).lower(params).compile(lowering.KEEP_REMAT_BARRIERS)
                for m in (plain, remat)}
    # Same drop-path masks and values: recomputation replays the same rng.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=3e-5, atol=3e-6),
                 compiled["block"](params), compiled["none"](params))
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    assert temp["block"] < 0.8 * temp["none"], temp

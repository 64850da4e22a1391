"""The HyperIQA head: pooling semantics, NCHW orders, outputs, dropout, dtypes, configs."""

import ast
import collections
import copy
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import traverse_util

from hyperiqa_jax.config_defaults import model_config
from hyperiqa_jax.models import build_model
from hyperiqa_jax.models.hyperiqa import (
    BatchedTargetNetwork,
    ChannelAttention,
    HyperNetwork,
    TargetNetwork,
    adaptive_avg_pool,
    mean_pool,
    nchw_flatten,
)
from tests import train_utils
from weights_conversion import hyperiqa as conversion
from weights_conversion import hyperiqa_parity

CONFIG_NAMES = ("base", "small", "tiny", "ablation_single_scale", "ablation_multiscale",
                "resnet50_hyperiqa", "smart_iqa_scale")


@pytest.fixture(autouse=True)
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


def small_model_config(attention="channel", multi_scale=True, narrow=False, **fields):
    """Tiny's head on a one-block-per-stage Swin (narrow: 32..256 channels, for speed)."""
    config = model_config("tiny")
    config.backbone_overrides.depths = (1, 1, 1, 1)
    if narrow:
        config.backbone_overrides.embed_dim = 32
        config.backbone_overrides.num_heads = (1, 2, 4, 8)
    config.attention = attention
    config.multi_scale = multi_scale
    for key, value in fields.items():
        setattr(config, key, value)
    return config


def random_variables(model, images, seed=0):
    """Random float32 variables without running `init` (whose RNG graph compiles slowly)."""
    rng = np.random.RandomState(seed)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    return jax.tree.map(lambda s: jnp.asarray(rng.randn(*s.shape) * 0.05, jnp.float32), shapes)


@pytest.mark.parametrize("in_hw,out_hw", [((56, 56), (7, 7)), ((14, 14), (7, 7)),
                                          ((7, 7), (7, 7)), ((15, 10), (7, 7)),
                                          ((9, 13), (7, 7)), ((5, 6), (7, 7)),
                                          ((20, 20), (3, 6))])
def test_adaptive_avg_pool_matches_pytorch(in_hw, out_hw):
    x = np.random.RandomState(0).randn(2, *in_hw, 5).astype(np.float32)
    expected = F.adaptive_avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), out_hw)
    got = adaptive_avg_pool(jnp.asarray(x), out_hw)
    np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(),
                               atol=3e-6)  # measured <= 1.8e-7


@pytest.mark.parametrize("hw", [(56, 56), (28, 28), (64, 64), (9, 15)])
def test_mean_pool_matches_pytorch_avg_pool(hw):
    # LDA's AvgPool2d(7, stride=7): floor division drops the remainder rows/columns.
    x = np.random.RandomState(1).randn(2, *hw, 3).astype(np.float32)
    expected = F.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 7, stride=7)
    got = mean_pool(jnp.asarray(x), (7, 7))
    np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(), atol=2e-6)


def test_nchw_flatten_is_pytorch_view_order():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)  # NHWC
    expected = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().view(2, -1).numpy()
    np.testing.assert_array_equal(np.asarray(nchw_flatten(jnp.asarray(x))), expected)


def test_batched_target_network_is_per_image():
    rng = np.random.RandomState(0)
    sizes = (6, 5, 4, 3, 2)
    weights = [rng.randn(3, o, i).astype(np.float32) for i, o in zip(sizes, sizes[1:])]
    weights.append(rng.randn(3, 1, sizes[-1]).astype(np.float32))
    biases = [rng.randn(3, w.shape[1]).astype(np.float32) for w in weights]
    x = rng.randn(3, sizes[0]).astype(np.float32)
    batched = BatchedTargetNetwork().apply({}, x, weights, biases)
    for b in range(3):
        single = TargetNetwork().apply({}, x[b], [w[b] for w in weights],
                                       [v[b] for v in biases])
        np.testing.assert_allclose(batched[b], single, rtol=1e-6)
        q = x[b]
        for w, v in zip(weights[:-1], biases[:-1]):
            q = 1 / (1 + np.exp(-(w[b] @ q + v[b])))
        np.testing.assert_allclose(batched[b], (weights[-1][b] @ q + biases[-1][b])[0],
                                   rtol=1e-5)


@pytest.mark.parametrize("attention,multi_scale,attention_shape", [
    ("channel", True, (2, 1440)), ("scale", True, (2, 4)), ("none", True, None),
    ("none", False, None), ("channel", False, (2, 768))])
def test_outputs(attention, multi_scale, attention_shape):
    config = small_model_config(attention, multi_scale)
    model = build_model(config)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    assert set(variables) == {"params"}
    assert "backbone" in variables["params"]
    out = jax.eval_shape(lambda v, x: model.apply(v, x, return_intermediates=True),
                         variables, images)
    assert out["score"].shape == (2,) and out["score"].dtype == jnp.float32
    if attention_shape is None:
        assert out["attention"] is None
    else:
        assert out["attention"].shape == attention_shape
    assert [m.shape[1:3] for m in out["stage_maps"]] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert out["target_in_vec"].shape == (2, 224)
    assert out["hyper_in_feat"].shape == (2, 7, 7, 112)
    expected = [(112, 224), (56, 112), (28, 56), (14, 28), (1, 14)]
    for i, shape in enumerate(expected):
        assert out[f"target_fc{i + 1}_weight"].shape == (2, *shape)
        assert out[f"target_fc{i + 1}_bias"].shape == (2, shape[0])


def test_dropout_uses_the_dropout_rng_only_in_training():
    config = small_model_config("scale", dropout=0.4, drop_path_rate=0.3)
    model = build_model(config)
    images = jnp.asarray(np.random.RandomState(1).randn(2, 224, 224, 3), jnp.float32)
    variables = random_variables(model, images)
    apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key})
                    ["score"])
    evaluate = jax.jit(lambda v, x: model.apply(v, x))
    out = evaluate(variables, images)
    np.testing.assert_array_equal(out["score"], evaluate(variables, images)["score"])
    np.testing.assert_allclose(out["attention"].sum(-1), 1.0, rtol=1e-6)
    train_a = apply(variables, images, jax.random.key(1))
    train_b = apply(variables, images, jax.random.key(1))
    train_c = apply(variables, images, jax.random.key(2))
    np.testing.assert_array_equal(train_a, train_b)
    assert not np.allclose(train_a, train_c)
    with pytest.raises(Exception, match="dropout"):
        model.apply(variables, images, train=True)


def _parameter_group(path):
    """backbone/<stage or patch_embed>, or the head module (lda, attention, hyper)."""
    return "/".join(path[:2]) if path[0] == "backbone" else path[0]


def _scores_and_grads(model_config, dtype, variables, images, labels):
    model_config = copy.deepcopy(model_config)
    model_config.dtype = dtype
    model = build_model(model_config)

    def loss(params):
        scores = model.apply({"params": params}, images, train=True,
                             rngs={"dropout": jax.random.key(0)})["score"]
        return jnp.mean(jnp.abs(scores - labels))

    return jax.jit(lambda p: (model.apply({"params": p}, images)["score"], jax.grad(loss)(p)))(
        variables["params"])


def test_bfloat16_agrees_with_float32_relative_to_the_score_spread():
    # Perturbed weights, target net calibrated so that the 8 images' scores spread over
    # 35..65 (float32 std 8.8): bfloat16 must track what the float32 model computes.
    config = small_model_config("channel")
    config.dropout = config.drop_path_rate = 0.0
    reference, images, _ = hyperiqa_parity.reference_model(config, seed=0, batch=8)
    variables = conversion.convert_state_dict(reference.state_dict(), config, "reference")
    images = jnp.asarray(images)
    scores32, _ = _scores_and_grads(config, "float32", variables, images, 0.0)
    # L1 targets 10 away from every score: no image sits at the loss's kink, where a
    # rounding-size change of the score would flip the sign of its gradient.
    labels = scores32 + 10.0 * (-1.0) ** jnp.arange(8)
    scores32, grads32 = _scores_and_grads(config, "float32", variables, images, labels)
    scores16, grads16 = _scores_and_grads(config, "bfloat16", variables, images, labels)

    assert scores16.dtype == jnp.float32
    spread = float(jnp.std(scores32))
    assert spread > 5
    error = np.abs(np.asarray(scores16) - np.asarray(scores32))
    # Measured: max 0.057-0.089 x spread, mean 0.032-0.037 x spread over two measurements
    # (XLA CPU; bfloat16 keeps 8 significant bits). Allowed: 0.15 and 0.06 x spread.
    assert error.max() <= 0.15 * spread, (error, spread)
    assert error.mean() <= 0.06 * spread, (error, spread)
    # Gradient direction per parameter group (measured cosines 0.9939 .. 0.9997).
    groups = {}
    flat32, flat16 = (traverse_util.flatten_dict(g) for g in (grads32, grads16))
    for path, g in flat32.items():
        assert flat16[path].dtype == jnp.float32  # gradients of float32 parameters.
        a, b = groups.setdefault(_parameter_group(path), ([], []))
        a.append(np.ravel(g))
        b.append(np.ravel(flat16[path]))
    assert {"lda", "attention", "hyper", "backbone/layers_0", "backbone/patch_embed"} <= set(
        groups)
    for group, (a, b) in groups.items():
        a, b = np.concatenate(a), np.concatenate(b)
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine >= 0.99, (group, cosine)


def _dot_operand_dtypes(lowered):
    """Counter of the operand element types of every dot_general / convolution."""
    counts = collections.Counter()
    for line in lowered.as_text().splitlines():
        if "stablehlo.dot_general" in line or "stablehlo.convolution" in line:
            operands = line.rsplit(":", 1)[1].split("->")[0]
            counts[tuple(sorted(set(re.findall(r"x(bf16|f32)>", operands))))] += 1
    return counts


def test_bfloat16_matmuls_with_float32_parameters_statistics_and_softmax():
    config = small_model_config("channel", narrow=True, dtype="bfloat16")
    model = build_model(config)
    images = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
    out = jax.eval_shape(lambda v, x: model.apply(v, x, return_intermediates=True),
                         shapes, images)
    assert out["score"].dtype == jnp.float32
    assert out["hyper_in_feat"].dtype == jnp.bfloat16
    # The residual stream, and so the stage maps, stay float32 (docs/models.md).
    assert all(m.dtype == jnp.float32 for m in out["stage_maps"])
    lowered = jax.jit(lambda v, x: model.apply(v, x)["score"]).trace(shapes, images).lower(
        lowering_platforms=("cuda",))
    dots = _dot_operand_dtypes(lowered)
    # Every backbone and head product in bfloat16; float32 only in the per-image
    # target net (4 hidden layers + output) and the channel attention's squeeze.
    assert dots[("bf16",)] > 20, dots
    assert set(dots) <= {("bf16",), ("f32",)}, dots
    assert dots[("f32",)] <= 5, dots
    text = lowered.as_text()
    # LayerNorm statistics and the attention softmax reduce in float32.
    assert "stablehlo.reduce" in text and not re.search(r"stablehlo\.reduce.*bf16.*bf16", text)


def test_scale_attention_needs_multi_scale():
    model = build_model(small_model_config("scale", multi_scale=False))
    with pytest.raises(ValueError, match="multi_scale"):
        model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds(name):
    path = Path(__file__).resolve().parents[2] / "configs" / f"{name}.py"
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert f"configs/{name}.py" in doc and "python -m" in doc
    assert "SRCC" in doc
    config = train_utils.load_config(name)
    model = build_model(config.model)
    shapes = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
    fused = {"base": 1920, "small": 1440, "tiny": 1440, "ablation_single_scale": 1024,
             "ablation_multiscale": 1920, "resnet50_hyperiqa": 2048, "smart_iqa_scale": 1920}
    kernel = shapes["params"]["hyper"]["feature_conv_0"]["kernel"]
    assert kernel.shape[2] == fused[name]
    assert ("batch_stats" in shapes) == (name == "resnet50_hyperiqa")
    assert ("attention" in shapes["params"]) == (config.model.attention != "none")


def test_config_files_exist():
    folder = Path(__file__).resolve().parents[2] / "configs"
    for name in CONFIG_NAMES:
        assert (folder / f"{name}.py").is_file()


def test_small_target_init_starts_unsaturated_with_a_zero_output_weight():
    fused = jnp.asarray(np.random.RandomState(0).randn(4, 7, 7, 96), jnp.float32)
    sizes = (224, 112, 56, 28, 14)
    net = HyperNetwork(feature_widths=(64, 64), target_fc_sizes=sizes[1:],
                       small_target_init=True)
    variables = net.init(jax.random.key(0), fused, train=False)
    feat, weights, biases = net.apply(variables, fused, train=False)
    rms = float(jnp.sqrt(jnp.mean(jnp.square(feat))))
    for w, fan_in in zip(weights[:-1], sizes[:-1]):
        # LeCun variance of the conv times 1/fan_in: std(w) = rms(feat) / sqrt(fan_in), a
        # little less since the 3x3 conv's zero padding feeds the border cells fewer inputs.
        ratio = float(jnp.std(w)) * np.sqrt(fan_in) / rms
        assert 0.75 < ratio < 1.1, (fan_in, ratio)
    np.testing.assert_array_equal(weights[-1], 0.0)  # score = generated output bias
    default = HyperNetwork(feature_widths=(64, 64), target_fc_sizes=sizes[1:])
    _, default_weights, _ = default.apply(default.init(jax.random.key(0), fused, train=False),
                                          fused, train=False)
    assert float(jnp.std(default_weights[0])) > 5 * float(jnp.std(weights[0]))


def test_attention_gate_bias_sets_the_initial_gate_and_defaults_to_pytorch_init():
    fused = jnp.asarray(np.random.RandomState(0).randn(2, 7, 7, 40), jnp.float32)
    default = ChannelAttention().init(jax.random.key(0), fused)
    biased = ChannelAttention(gate_bias=3.0).init(jax.random.key(0), fused)
    # Same parameters, same random values; only the expand layer's bias starts elsewhere.
    flat_default = traverse_util.flatten_dict(default)
    flat_biased = traverse_util.flatten_dict(biased)
    assert flat_default.keys() == flat_biased.keys()
    for key, value in flat_default.items():
        if key[-2:] == ("expand", "bias"):
            np.testing.assert_array_equal(value, 0.0)  # PyTorch's zero-initialised gate
            np.testing.assert_array_equal(flat_biased[key], 3.0)
        else:
            np.testing.assert_array_equal(value, flat_biased[key])
    # With nothing squeezed the gate is its bias: sigmoid(0) = 0.5 by default, sigmoid(3) here.
    zeros = jnp.zeros_like(fused)
    _, gate = ChannelAttention().apply(default, zeros)
    np.testing.assert_allclose(gate, 0.5)
    _, gate = ChannelAttention(gate_bias=3.0).apply(biased, zeros)
    np.testing.assert_allclose(gate, 1 / (1 + np.exp(-3.0)), rtol=1e-6)
    _, gate = ChannelAttention(gate_bias=3.0).apply(biased, fused)
    assert float(gate.mean()) > 0.9  # near identity at init on real features too

    assert build_model(small_model_config()).attention_gate_bias == 0.0
    model = build_model(small_model_config(attention_gate_bias=3.0))
    assert model.attention_gate_bias == 3.0

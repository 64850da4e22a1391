"""The HyperIQA head: pooling semantics, NCHW orders, outputs, dropout, dtypes, configs."""

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.common import model_config
from hyperiqa_jax.models import build_model
from hyperiqa_jax.models.hyperiqa import (
    BatchedTargetNetwork,
    HyperNetwork,
    TargetNetwork,
    adaptive_avg_pool,
    mean_pool,
    nchw_flatten,
)

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
                               atol=1e-6)


@pytest.mark.parametrize("hw", [(56, 56), (28, 28), (64, 64), (9, 15)])
def test_mean_pool_matches_pytorch_avg_pool(hw):
    # LDA's AvgPool2d(7, stride=7): floor division drops the remainder rows/columns.
    x = np.random.RandomState(1).randn(2, *hw, 3).astype(np.float32)
    expected = F.avg_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 7, stride=7)
    got = mean_pool(jnp.asarray(x), (7, 7))
    np.testing.assert_allclose(np.asarray(got), expected.permute(0, 2, 3, 1).numpy(), atol=1e-6)


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


def test_bfloat16_activations_give_a_float32_score():
    config = small_model_config("channel", narrow=True, dtype="bfloat16")
    model = build_model(config)
    images = jnp.asarray(np.random.RandomState(0).randn(1, 224, 224, 3), jnp.float32)
    variables = random_variables(model, images)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
    out = jax.jit(lambda v, x: model.apply(v, x, return_intermediates=True))(variables, images)
    assert out["score"].dtype == jnp.float32
    assert out["hyper_in_feat"].dtype == jnp.bfloat16
    float32_model = build_model(small_model_config("channel", narrow=True))
    reference = jax.jit(lambda v, x: float32_model.apply(v, x)["score"])(variables, images)
    np.testing.assert_allclose(out["score"], reference, rtol=0.1, atol=0.1)


def test_scale_attention_needs_multi_scale():
    model = build_model(small_model_config("scale", multi_scale=False))
    with pytest.raises(ValueError, match="multi_scale"):
        model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_every_config_builds(name):
    module = importlib.import_module(f"configs.{name}")
    doc = module.__doc__
    assert f"configs/{name}.py" in doc and "python -m" in doc
    assert "SRCC" in doc
    config = module.get_config()
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

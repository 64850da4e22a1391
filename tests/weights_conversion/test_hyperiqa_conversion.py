"""Full-checkpoint conversion: the four formats, detection, errors, and the CLI.

Foreign checkpoints are built from the reference modules re-assembled in the
public code's module structure (attribute names and Sequential indices), so
their keys come from that structure, not from the converter's rename tables.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util
from torch import nn

from hyperiqa_jax.config_defaults import reference_config
from hyperiqa_jax.models import build_model
from hyperiqa_jax.params_io import load_params
from weights_conversion import hyperiqa as conversion
from weights_conversion.convert_checkpoint import convert
from weights_conversion.hyperiqa_parity import make_images
from weights_conversion.swin import ConversionError
from weights_conversion.torch_reference import HyperIQAReference, perturb

REPO = Path(__file__).resolve().parents[2]


def swin_config(attention="scale", multi_scale=True):
    config = reference_config("tiny")
    config.model.backbone_overrides.depths = (1, 1, 1, 1)
    config.model.attention = attention
    config.model.multi_scale = multi_scale
    return config


def resnet_config():
    config = reference_config("base")
    config.model.update(backbone="resnet50", multi_scale=False, attention="none", dropout=0.0,
                        drop_path_rate=0.0)
    return config


def reference(config, seed=0):
    torch.manual_seed(seed)
    model = HyperIQAReference(config.model)
    perturb(model, seed)
    return model.eval()


def container(**modules) -> nn.Module:
    module = nn.Module()
    for name, child in modules.items():
        setattr(module, name, child)
    return module


def hyper_heads(ref) -> dict:
    """conv1 + fc{i}w_conv / fc{i}b_fc / fc5w_fc as in SSL92/hyperIQA and SMART-IQA."""
    h = ref.hyper
    heads = {"conv1": nn.Sequential(h.feature_conv_0, nn.ReLU(), h.feature_conv_1, nn.ReLU(),
                                    h.feature_conv_2, nn.ReLU())}
    for i in range(1, 5):
        heads[f"fc{i}w_conv"] = getattr(h, f"fc{i}_weight_conv")
        heads[f"fc{i}b_fc"] = getattr(h, f"fc{i}_bias_fc")
    heads["fc5w_fc"] = h.fc5_weight_fc
    heads["fc5b_fc"] = h.fc5_bias_fc
    return heads


def lda_modules(ref) -> dict:
    """lda{k}_pool = Sequential(conv, AvgPool2d), lda{k}_fc = Linear (k = 1..4)."""
    lda = ref.lda
    out = {}
    for i in range(3):
        out[f"lda{i + 1}_pool"] = nn.Sequential(getattr(lda, f"conv_{i}"), nn.AvgPool2d(7, 7))
        out[f"lda{i + 1}_fc"] = getattr(lda, f"fc_{i}")
    out["lda4_pool"] = nn.AvgPool2d(7, 7)
    out["lda4_fc"] = lda.fc_3
    return out


def smart_iqa_state_dict(ref) -> dict:
    swin = container(backbone=ref.backbone, **lda_modules(ref))
    modules = {"swin": swin, **hyper_heads(ref)}
    if ref.attention_kind == "scale":
        net = nn.Sequential(ref.attention.hidden, nn.ReLU(), nn.Dropout(0.5),
                            ref.attention.logits, nn.Softmax(dim=1))
        modules["multiscale_attention"] = container(attention_net=net)
    return container(**modules).state_dict()


def original_hyperiqa_state_dict(ref) -> dict:
    names = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")
    res = container(**{n: getattr(ref.backbone, n) for n in names}, **lda_modules(ref))
    return container(res=res, **hyper_heads(ref)).state_dict()


def pyiqa_state_dict(ref) -> dict:
    lda, h = ref.lda, ref.hyper
    lda_list = nn.ModuleList(
        [nn.Sequential(getattr(lda, f"conv_{i}"), nn.AvgPool2d(7, 7), nn.Flatten(),
                       getattr(lda, f"fc_{i}")) for i in range(3)]
        + [nn.Sequential(nn.AvgPool2d(7, 7), nn.Flatten(), lda.fc_3)])
    pool = lambda layer: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), layer)
    fc_w = nn.ModuleList([getattr(h, f"fc{i}_weight_conv") for i in range(1, 5)]
                         + [pool(h.fc5_weight_fc)])
    fc_b = nn.ModuleList([pool(getattr(h, f"fc{i}_bias_fc")) for i in range(1, 6)])
    conv1 = nn.Sequential(h.feature_conv_0, nn.ReLU(), h.feature_conv_1, nn.ReLU(),
                          h.feature_conv_2, nn.ReLU())
    return container(base_model=ref.backbone, lda_modules=lda_list, fc_w_modules=fc_w,
                     fc_b_modules=fc_b, conv1=conv1).state_dict()


def assert_same_tree(a, b):
    flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(flat_a[key], flat_b[key], err_msg="/".join(key))


@pytest.fixture(scope="module")
def resnet_reference():
    config = resnet_config()
    ref = reference(config)
    return config, ref, conversion.convert_state_dict(ref.state_dict(), config.model)


@pytest.mark.parametrize("attention,multi_scale", [("scale", True), ("none", True),
                                                   ("none", False)])
def test_smart_iqa_format(attention, multi_scale):
    config = swin_config(attention, multi_scale)
    ref = reference(config)
    foreign = smart_iqa_state_dict(ref)
    for key in ("swin.backbone.layers_0.blocks.0.attn.qkv.weight", "swin.lda1_pool.0.weight",
                "swin.lda4_fc.bias", "conv1.4.bias", "fc1w_conv.weight", "fc5w_fc.weight"):
        assert key in foreign
    if attention == "scale":
        assert "multiscale_attention.attention_net.3.weight" in foreign
    assert conversion.detect_format(foreign) == "smart_iqa"
    expected = conversion.convert_state_dict(ref.state_dict(), config.model, "reference")
    assert_same_tree(conversion.convert_state_dict(foreign, config.model), expected)
    # Wrapped and DataParallel-prefixed files convert the same.
    wrapped = {"state_dict": {f"module.{k}": v for k, v in foreign.items()}}
    assert_same_tree(conversion.convert_state_dict(wrapped, config.model), expected)


def test_original_hyperiqa_format(resnet_reference):
    config, ref, expected = resnet_reference
    foreign = original_hyperiqa_state_dict(ref)
    for key in ("res.conv1.weight", "res.layer4.2.bn3.running_var", "res.lda1_pool.0.weight",
                "res.lda4_fc.weight", "res.layer1.0.downsample.1.weight", "conv1.0.weight",
                "fc4w_conv.bias", "fc5b_fc.weight"):
        assert key in foreign
    assert conversion.detect_format(foreign) == "hyperiqa"
    assert_same_tree(conversion.convert_state_dict(foreign, config.model), expected)
    assert "batch_stats" in expected
    # Checkpoints saved before num_batches_tracked existed convert too.
    old = {k: v for k, v in foreign.items() if not k.endswith("num_batches_tracked")}
    assert_same_tree(conversion.convert_state_dict(old, config.model), expected)


def test_pyiqa_format(resnet_reference):
    config, ref, expected = resnet_reference
    foreign = pyiqa_state_dict(ref)
    for key in ("base_model.layer1.0.conv1.weight", "lda_modules.0.3.weight",
                "lda_modules.3.2.bias", "fc_w_modules.4.2.weight", "fc_b_modules.4.2.bias",
                "conv1.2.weight"):
        assert key in foreign
    assert conversion.detect_format(foreign) == "pyiqa"
    assert_same_tree(conversion.convert_state_dict({"params": foreign}, config.model), expected)


def test_unknown_and_missing_keys_are_listed():
    config = swin_config("scale")
    foreign = smart_iqa_state_dict(reference(config))
    extra = dict(foreign, **{"swin.extra_head.weight": torch.zeros(3)})
    with pytest.raises(ConversionError, match="swin.extra_head.weight"):
        conversion.convert_state_dict(extra, config.model)
    missing = {k: v for k, v in foreign.items() if not k.startswith("fc3b_fc.")}
    with pytest.raises(ConversionError, match="hyper/fc3_bias_fc/kernel"):
        conversion.convert_state_dict(missing, config.model)
    # A scale-attention checkpoint does not fit a channel-attention config.
    channel = swin_config("channel")
    with pytest.raises(ConversionError, match="attention/expand/kernel"):
        conversion.convert_state_dict(foreign, channel.model)
    with pytest.raises(ConversionError, match="format"):
        conversion.convert_state_dict({"foo.weight": torch.zeros(1)}, config.model)


def test_convert_original_checkpoint_file_and_score(tmp_path, resnet_reference):
    """koniq_pretrained.pkl-style file -> params dir -> the same scores as PyTorch."""
    config, ref, _ = resnet_reference
    path = tmp_path / "koniq_pretrained.pkl"
    torch.save(original_hyperiqa_state_dict(ref), path)
    meta = convert(config, str(path), str(tmp_path / "out"))
    assert meta["format"] == "hyperiqa"
    variables, saved_meta = load_params(tmp_path / "out")
    assert saved_meta["format"] == "hyperiqa"
    images = make_images(2, 224)
    with torch.no_grad():
        expected = ref(torch.from_numpy(images).permute(0, 3, 1, 2))["score"].numpy()
    model = build_model(config.model)
    with jax.default_matmul_precision("highest"):
        got = jax.jit(lambda v, x: model.apply(v, x)["score"])(variables, jnp.asarray(images))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-4)


def test_cli(tmp_path):
    config_file = tmp_path / "small_smart_iqa.py"
    config_file.write_text(
        "from hyperiqa_jax.config_defaults import reference_config\n\n\n"
        "def get_config():\n"
        "    config = reference_config('base')\n"
        "    config.model.attention = 'scale'\n"
        "    config.model.backbone = 'swin_tiny_patch4_window7_224'\n"
        "    config.model.backbone_overrides.depths = (1, 1, 1, 1)\n"
        "    return config\n")
    config = swin_config("scale")
    checkpoint = tmp_path / "best_model.pth"
    torch.save(smart_iqa_state_dict(reference(config)), checkpoint)
    command = [sys.executable, "-m", "weights_conversion.convert_checkpoint",
               f"--config={config_file}", f"--checkpoint={checkpoint}",
               f"--out={tmp_path / 'out'}"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "smart_iqa" in done.stdout
    variables, meta = load_params(tmp_path / "out")
    assert meta["contents"] == "variables" and "attention" in variables["params"]

    bad = tmp_path / "bad.pth"
    torch.save({"swin.backbone.nonsense": torch.zeros(1)}, bad)
    done = subprocess.run(command[:-2] + [f"--checkpoint={bad}", f"--out={tmp_path / 'x'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "nonsense" in done.stderr

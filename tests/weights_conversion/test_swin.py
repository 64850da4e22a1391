"""Swin checkpoint conversion: every key layout, file formats, and refusal of bad files."""

import pickle
import re

import numpy as np
import pytest
import timm
import torch
from flax import traverse_util

from hyperiqa_jax import cli
from hyperiqa_jax.params_io import load_params, save_params
from weights_conversion import convert_timm, parity_limits
from weights_conversion import swin as conversion

NAME = "swin_tiny_patch4_window7_224"


@pytest.fixture(scope="module")
def timm_state_dict():
    torch.manual_seed(0)
    return timm.create_model(NAME, pretrained=False).state_dict()  # timm >= 0.9 names, with head.


@pytest.fixture(scope="module")
def reference_params(timm_state_dict):
    return traverse_util.flatten_dict(conversion.convert_state_dict(timm_state_dict, NAME))


def _assert_same(params, reference):
    flat = traverse_util.flatten_dict(params)
    assert flat.keys() == reference.keys()
    for key in flat:
        np.testing.assert_array_equal(flat[key], reference[key], err_msg=str(key))


def _old_layout(state_dict):
    """timm < 0.9 / Microsoft: downsample at the end of stages 0-2, buffers, under 'model'."""
    old = {}
    for key, value in state_dict.items():
        key = re.sub(r"^layers\.(\d+)\.downsample",
                     lambda m: f"layers.{int(m.group(1)) - 1}.downsample", key)
        old[key.replace("head.fc.", "head.")] = value
    for i, depth in enumerate((2, 2, 6, 2)):
        for j in range(depth):
            old[f"layers.{i}.blocks.{j}.attn.relative_position_index"] = torch.zeros(49, 49)
            if j % 2:
                old[f"layers.{i}.blocks.{j}.attn_mask"] = torch.zeros(4, 49, 49)
    return {"model": old}


def test_known_parameters_land_where_expected(timm_state_dict, reference_params):
    qkv = timm_state_dict["layers.2.blocks.3.attn.qkv.weight"].numpy()
    np.testing.assert_array_equal(
        reference_params[("layers_2", "blocks_3", "attn", "qkv", "kernel")], qkv.T)
    conv = timm_state_dict["patch_embed.proj.weight"].numpy()
    np.testing.assert_array_equal(
        reference_params[("patch_embed", "proj", "kernel")], conv.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(
        reference_params[("layers_1", "downsample", "norm", "scale")],
        timm_state_dict["layers.1.downsample.norm.weight"].numpy())


@pytest.mark.parametrize("layout", ["features_only", "old", "module_prefix", "backbone_prefix",
                                    "numpy"])
def test_every_layout_converts_to_the_same_params(layout, timm_state_dict, reference_params):
    sd = dict(timm_state_dict)
    if layout == "features_only":
        sd = {re.sub(r"^layers\.(\d+)\.", r"layers_\1.", k): v for k, v in sd.items()
              if not k.startswith(("head", "norm."))}
    elif layout == "old":
        sd = _old_layout(sd)
    elif layout == "module_prefix":
        sd = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    elif layout == "backbone_prefix":
        sd = {f"backbone.{k}": v for k, v in sd.items()}
    elif layout == "numpy":
        sd = {k: v.numpy() for k, v in sd.items()}
    _assert_same(conversion.convert_state_dict(sd, NAME), reference_params)


def test_features_only_state_dict_runs_like_timm():
    torch.manual_seed(1)
    features = timm.create_model(NAME, pretrained=False, features_only=True)
    from weights_conversion.validate_parity import swin_parity
    results = swin_parity(NAME, state_dict=features.state_dict(), batch=1)
    for diff in results.values():
        assert diff["max_abs"] <= parity_limits.swin_stage_limit(diff["ref_max_abs"]), diff


def test_unknown_and_missing_keys_are_listed(timm_state_dict):
    sd = dict(timm_state_dict)
    del sd["layers.1.blocks.0.mlp.fc1.bias"]
    sd["layers.1.blocks.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(conversion.ConversionError) as info:
        conversion.convert_state_dict(sd, NAME)
    message = str(info.value)
    assert "layers.1.blocks.0.extra.weight" in message
    assert "layers_1/blocks_0/mlp/fc1/bias" in message


def test_shape_mismatch_is_reported(timm_state_dict):
    with pytest.raises(conversion.ConversionError, match="shape mismatches") as info:
        conversion.convert_state_dict(timm_state_dict, "swin_base_patch4_window7_224")
    assert "layers.0.blocks.0.attn.proj.bias: file (96,) vs model (128,)" in str(info.value)


def test_pth_and_safetensors_files(tmp_path, timm_state_dict, reference_params):
    from safetensors.torch import save_file
    torch.save(timm_state_dict, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in timm_state_dict.items()}, tmp_path / "w.safetensors")
    for name in ("w.pth", "w.safetensors"):
        sd = conversion.load_state_dict_file(tmp_path / name)
        _assert_same(conversion.convert_state_dict(sd, NAME), reference_params)


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran during unpickling",))


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "payload": _RunsCode()}, path)
    with pytest.raises(conversion.ConversionError, match="refusing to load"):
        conversion.load_state_dict_file(path)
    assert "this ran during unpickling" not in capsys.readouterr().out
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(conversion.ConversionError):
        conversion.load_state_dict_file(raw)
    assert "this ran during unpickling" not in capsys.readouterr().out


def convert(argv):
    """`python -m weights_conversion.convert_timm ARGV`, in this process: its exit status."""
    return cli.call(convert_timm.main, argv, define_flags=convert_timm.define_flags,
                    expected=convert_timm.EXPECTED)


def test_convert_cli_writes_loadable_params(tmp_path, timm_state_dict, reference_params, capsys):
    torch.save(timm_state_dict, tmp_path / "w.pth")
    out = tmp_path / "converted"
    assert convert(["--model", NAME, "--checkpoint", str(tmp_path / "w.pth"),
                    "--out", str(out)]) == 0
    assert "parity with timm" in capsys.readouterr().out
    params, meta = load_params(out)
    assert meta["model"] == NAME
    _assert_same(params, reference_params)


def test_convert_cli_missing_file_is_a_clear_error(tmp_path, capsys):
    assert convert(["--model", NAME, "--checkpoint", str(tmp_path / "nope.pth"),
                    "--out", str(tmp_path / "o")]) == 2
    assert "checkpoint file not found" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["--checkpoint=w.pth", "--out=o"], "--model required"),
    (["--model", NAME, "--out=o"], "exactly one of --checkpoint FILE and --pretrained"),
    (["--model", NAME, "--checkpoint=w.pth", "--pretrained", "--out=o"], "exactly one of"),
    (["--model", NAME, "--checkpoint=w.pth", "--no-verify", "--out=o"], "no-verify"),
    (["--model", "swin_tiny", "--checkpoint=w.pth", "--out=o"], "--model"),
])
def test_convert_cli_usage_errors(argv, fragment, capsys):
    assert convert(argv) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and fragment in line, line


def test_load_params_missing_dir_says_how_to_convert(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_timm"):
        load_params(tmp_path / "absent")


def test_save_params_replaces_atomically(tmp_path):
    save_params(tmp_path / "p", {"a": np.ones(3, np.float32)}, {"v": 1})
    save_params(tmp_path / "p", {"a": np.zeros(3, np.float32)}, {"v": 2})
    params, meta = load_params(tmp_path / "p")
    np.testing.assert_array_equal(params["a"], np.zeros(3))
    assert meta == {"v": 2}
    assert not (tmp_path / "p.tmp").exists()

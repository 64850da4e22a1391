"""Resuming a workdir whose checkpoint does not fit the config, or cannot be read.

Each case stops with one line (a UserError) before any step is trained: what
differs, or which older step there is, and what to do; nothing is deleted.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from hyperiqa_jax import checkpointing, train
from hyperiqa_jax.errors import UserError
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]

# The tiny config's fused channels: its four stage widths 8, 16, 32, 64. The channel
# attention's `expand` layer maps them back to as many gate logits.
FUSED = 8 + 16 + 32 + 64


def _config(root, **model_overrides):
    c = train_utils.tiny_config(root=root)
    c.model.update(model_overrides)
    return c


def _files(folder):
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*")
            if p.is_file()}


def _resume_error(config, workdir):
    with pytest.raises(UserError) as info:
        train.train_and_evaluate(config, str(workdir))
    text = str(info.value)
    assert "\n" not in text
    return text


def test_another_attention_names_the_setting_and_the_parameters(tmp_path, demo_root):
    train_utils.save_init_checkpoint(tmp_path, _config(demo_root))
    before = _files(tmp_path)
    text = _resume_error(_config(demo_root, attention="none"), tmp_path)
    assert "model.attention is 'channel' in the checkpoint, 'none' here" in text
    # The first parameters in path order: the attention's, which this model lacks.
    assert (f"params/attention/expand/bias: float32[{FUSED}] in the checkpoint, absent here; "
            f"params/attention/expand/kernel: float32[{FUSED // 4},{FUSED}] in the checkpoint, "
            "absent here; params/attention/reduce/bias") in text
    assert "(and 1 more)" in text  # attention/reduce/kernel: the optimiser's copies not counted
    meta = tmp_path / "checkpoints" / "0" / "meta" / "metadata"
    assert f"python -m json.tool {meta}" in text and "new --workdir" in text
    assert _files(tmp_path) == before


def test_another_backbone_width_names_the_shapes(tmp_path, demo_root):
    train_utils.save_init_checkpoint(tmp_path, _config(demo_root))
    wider = _config(demo_root)
    wider.model.backbone_overrides.embed_dim = 16
    text = _resume_error(wider, tmp_path)
    assert "model.backbone_overrides.embed_dim is 8 in the checkpoint, 16 here" in text
    assert (f"params/attention/expand/bias: float32[{FUSED}] in the checkpoint, "
            f"float32[{2 * FUSED}] here") in text


def test_another_parameter_dtype_names_the_dtypes(tmp_path, demo_root):
    config = _config(demo_root)
    _, train_state = train_utils.save_init_checkpoint(tmp_path / "f32", config)
    # The same run with bfloat16 parameters: no setting differs.
    half = dict(train_state, params=jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                                 train_state["params"]))
    import grain

    ckpt = checkpointing.Checkpointer(tmp_path / "bf16", keep=1)
    meta = checkpointing.restore_latest_meta(checkpointing.Checkpointer(tmp_path / "f32"), 0)
    ckpt.save(0, half, iter(grain.MapDataset.range(4).to_iter_dataset()), meta)
    ckpt.wait()
    ckpt.close()
    text = _resume_error(config, tmp_path / "bf16")
    assert (f"params/attention/expand/bias: bfloat16[{FUSED}] in the checkpoint, "
            f"float32[{FUSED}] here") in text
    assert "model." not in text  # no setting named: the configs are the same
    assert text.endswith("Its saved config matches this one, so other code wrote it: train into "
                         "a new --workdir")


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory, demo_root):
    """A workdir trained 2 steps with a checkpoint after each."""
    workdir = tmp_path_factory.mktemp("run")
    config = train_utils.tiny_config(root=demo_root)
    config.train.update(max_steps=2, checkpoint_every_steps=1, keep_checkpoints=2,
                        eval_every_epochs=0, final_eval=False)
    train.train_and_evaluate(config, str(workdir))
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [1, 2]
    return config, workdir


@pytest.mark.parametrize("damaged", ["state/_METADATA", "data_iter/process_0-of-1.json"])
def test_unreadable_newest_checkpoint_names_the_older_step(tmp_path, two_steps, damaged):
    config, trained = two_steps
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    newest = workdir / "checkpoints" / "2"
    damaged = newest / damaged
    damaged.write_bytes(damaged.read_bytes()[:damaged.stat().st_size // 2])
    before = _files(workdir)
    text = _resume_error(config, workdir)
    assert f"the newest checkpoint, step 2 in {workdir / 'checkpoints'}, cannot be read" in text
    assert f"Step 1 is the checkpoint before it: to resume from there, move {newest} out" in text
    assert _files(workdir) == before  # nothing deleted or rewritten
    # Doing what it says resumes from step 1.
    shutil.move(newest, tmp_path / "step_2_damaged")
    assert train.train_and_evaluate(config, str(workdir))["start_step"] == 1


def test_train_command_prints_one_line(tmp_path, demo_root):
    config = _config(demo_root)
    train_utils.save_init_checkpoint(tmp_path / "run", config)
    (tmp_path / "tiny.py").write_text(
        "from tests import train_utils\n\n\ndef get_config():\n"
        f"    return train_utils.tiny_config({demo_root!r})\n")
    env = dict(os.environ, HYPERIQA_ALLOCATOR="system")
    proc = subprocess.run(
        [sys.executable, "-m", "hyperiqa_jax.train", f"--config={tmp_path / 'tiny.py'}",
         f"--workdir={tmp_path / 'run'}", "--config.model.attention=scale"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "model.attention is 'channel' in the checkpoint, 'scale' here" in errors[0]

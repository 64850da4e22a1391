"""Tiny configs, data sets and checkpoints shared by the training/scoring tests."""

import json
import os
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from hyperiqa_jax import config_defaults
from hyperiqa_jax.config_checks import load_config_file

REPO = Path(__file__).resolve().parents[1]


def load_config(name):
    """configs/<name>.py of the repository, read by path as the commands read it."""
    return load_config_file(str(REPO / "configs" / f"{name}.py"))


def tiny_config(root="", name="demo"):
    """The demo config shrunk until a step takes milliseconds (56 px crops, width 8).

    Patch size 1 keeps the stage maps at 56/28/14/7, which the HyperIQA heads need;
    the target net is shrunk to 98 -> 14 -> 7 -> 7 -> 7 -> 1.
    """
    c = config_defaults.demo_config()
    c.data.name = name
    c.data.root = root
    c.data.crop_size = 56
    c.data.train_crops = 2
    c.data.test_crops = 2
    c.data.num_workers = 1
    m = c.model
    m.img_size = 56
    m.backbone_overrides = dict(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                patch_size=1, window_size=7)
    m.hyper_feature_widths = (16, 16)
    m.hyper_in_channels = 16
    m.target_in_size = 98
    m.target_fc_sizes = (14, 7, 7, 7)
    m.dropout = 0.1
    m.drop_path_rate = 0.1
    t = c.train
    t.batch_size = 8
    t.eval_batch_size = 8
    t.epochs = 2
    t.warmup_steps = 2
    t.log_every_steps = 1
    t.checkpoint_every_steps = 1000
    # Pinned, so the tests' tolerances do not move when the demo recipe is tuned.
    m.attention = "channel"
    m.small_target_init = False
    t.lr, t.lr_ratio = 3e-4, 10.0
    t.loss, t.ranking_loss_weight = "smooth_l1", 0.5
    t.eval_every_epochs = 1
    t.final_eval = True
    return c


def write_images(folder, n, *, seed=0, size=(72, 64)):
    """n smooth random RGB images with distinct noise levels; returns (paths, scores)."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    paths, scores = [], []
    for i in range(n):
        base = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        img = np.asarray(Image.fromarray(base).resize(size[::-1], Image.BICUBIC), np.float32)
        level = i % 4
        img = np.clip(img + rng.normal(0, 12 * level, img.shape), 0, 255).astype(np.uint8)
        path = os.path.join(folder, f"img_{i:03d}.png")
        Image.fromarray(img).save(path)
        paths.append(path)
        scores.append(100.0 - 20 * level + rng.normal(0, 1))
    return paths, scores


def write_manifest_dataset(root, n_train=16, n_test=8, seed=0):
    """A 'manifest' data set (manifest.csv with path, score, split) of small images."""
    paths, scores = write_images(os.path.join(root, "images"), n_train + n_test, seed=seed)
    with open(os.path.join(root, "manifest.csv"), "w") as f:
        f.write("path,score,split\n")
        for i, (p, s) in enumerate(zip(paths, scores)):
            split = "train" if i < n_train else "test"
            f.write(f"{os.path.relpath(p, root)},{s:.3f},{split}\n")
    return root


def save_init_checkpoint(workdir, config, label_stats=(50.0, 20.0)):
    """A step-0 training checkpoint of `config` without training (for scoring tests)."""
    import grain

    from hyperiqa_jax import checkpointing, optim, state, train
    from hyperiqa_jax.models import build_model

    train.check_config(config)
    model = build_model(config.model)
    tx = optim.make_optimizer(config.train, 1)
    train_state = jax.jit(lambda r: state.init_train_state(model, tx, config.data.crop_size, r))(
        jax.random.PRNGKey(0))
    it = iter(grain.MapDataset.range(4).to_iter_dataset())
    ckpt = checkpointing.Checkpointer(workdir, keep=1)
    meta = {"config": json.loads(config.to_json_best_effort()),
            "label_mean_std": list(label_stats), "step": 0, "state_kind": "train"}
    ckpt.save(0, train_state, it, meta)
    ckpt.wait()
    ckpt.close()
    return model, train_state


def enable_compilation_cache():
    """Persistent XLA cache: the tests compile the same tiny programs many times."""
    path = os.environ.get("HYPERIQA_JAX_TEST_JAX_CACHE",
                          os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache",
                                       "jax_test_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def write_config_file(path, config):
    """A config file (read by path, as the commands read one) that rebuilds `config`.

    It starts from the demo recipe and sets every section's values, so it needs
    nothing but the installed package.
    """
    sections = {k: v for k, v in config.to_dict().items() if isinstance(v, dict)}
    top = {k: v for k, v in config.to_dict().items() if not isinstance(v, dict)}
    lines = ["from hyperiqa_jax.config_defaults import demo_config", "", "",
             "def get_config():", "    config = demo_config()"]
    lines += [f"    config.{name}.update({values!r})" for name, values in sections.items()]
    lines += [f"    config.update({top!r})", "    return config", ""]
    Path(path).write_text("\n".join(lines))
    return str(path)

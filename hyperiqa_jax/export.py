r"""Exports a trained checkpoint as a model that needs only JAX to run.

    python -m hyperiqa_jax.export --checkpoint runs/base --out model_dir/
    python exported.py model_dir/ photo.jpg more/*.jpg       # scoring, anywhere

writes three files into `--out`:

- `scoring.jax`: a `jax.export` artifact of the scoring function,
  `score(variables, crops)`: uint8 crops [batch, crops, S, S, 3] (RGB) in,
  {"score": float32 [batch] (the mean over an image's crops),
  "crop_scores": float32 [batch, crops]} out, in label units (higher = better
  quality). `batch` and `crops` are symbolic: any number of images and crops
  per call, one artifact. Lowered for cpu, cuda and tpu together (the XLA:CPU
  kernels of models/cpu_kernels.py run on the CPU only).
- `weights.npz`: the model variables, one array per "params/..." or
  "batch_stats/..." path (plain numpy arrays, no pickle).
- `model.json`: what a caller needs: the crop size, the resize, the crop
  protocol and count, the score scale and direction, the training run and
  commit, and the JAX version it was exported with.

`hyperiqa_jax/exported.py` loads and runs the three with jax, numpy and pillow
alone, decoding, resizing and cropping exactly as this package does for the
grid protocol; it is one file to copy next to the model (docs/export.md).

An artifact stays loadable by JAX releases up to 6 months newer than the one
that exported it (jax.export's compatibility window); re-export from the
checkpoint to renew it.
"""

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from hyperiqa_jax.data import image as image_lib
from hyperiqa_jax.errors import ConfigError, UserError

PLATFORMS = ("cpu", "cuda", "tpu")
FUNCTION_FILE = "scoring.jax"
WEIGHTS_FILE = "weights.npz"
META_FILE = "model.json"
FORMAT = "hyperiqa_jax exported model"
FORMAT_VERSION = 1


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_string("checkpoint", None, "Training workdir (uses its best checkpoint), best/, "
                        "checkpoints/ or a step folder.")
    flags.DEFINE_string("out", None, "Folder to write scoring.jax, weights.npz and model.json "
                        "into (created; files of an earlier export there are replaced).")
    flags.DEFINE_list("platforms", list(PLATFORMS), "Platforms the artifact runs on, "
                      f"comma-separated, from {', '.join(PLATFORMS)}.")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of matrix "
                      "products and convolutions in the artifact, on every platform "
                      "(parameters stay float32).")
    flags.DEFINE_integer("num_crops", None, "Grid crops per image that model.json asks a caller "
                         "for (default: the run's data.test_crops); the artifact takes any count.")


def scoring_function(model, label_stats):
    """score(variables, uint8 crops [B, C, S, S, 3]) -> {"score": [B], "crop_scores": [B, C]}.

    The scoring forward of training-time evaluation and QualityModel
    (`scoring.predict_scores`) on every crop, then the mean over each image's.
    """
    from hyperiqa_jax.scoring import predict_scores

    def score(variables, crops):
        batch, count = crops.shape[:2]
        flat = crops.reshape((batch * count, *crops.shape[2:]))
        crop_scores, _ = predict_scores(model, variables, flat, label_stats)
        crop_scores = crop_scores.reshape((batch, count))
        return {"score": jnp.mean(crop_scores, axis=1), "crop_scores": crop_scores}

    return score


def export_scoring(model, variables, crop_size, label_stats, platforms=PLATFORMS):
    """The `jax.export.Exported` of `scoring_function`, batch and crop count symbolic."""
    batch, count = jax.export.symbolic_shape("batch, crops")
    crops = jax.ShapeDtypeStruct((batch, count, crop_size, crop_size, 3), jnp.uint8)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), variables)
    fn = jax.jit(scoring_function(model, label_stats))
    return jax.export.export(fn, platforms=tuple(platforms))(abstract, crops)


def flat_weights(variables):
    """{"params/backbone/.../kernel": numpy array}: the variables as npz entries."""
    out = {}
    for path, value in jax.tree_util.tree_flatten_with_path(jax.device_get(variables))[0]:
        out["/".join(str(k.key) for k in path)] = np.asarray(value)
    return out


def model_card(ckpt, *, dtype, platforms, num_crops):
    """model.json: preprocessing, score scale, provenance."""
    config = ckpt.config
    data, m = config.data, config.model
    resize = data.resize
    resize = list(resize) if isinstance(resize, (tuple, list)) else resize
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "function": FUNCTION_FILE, "weights": WEIGHTS_FILE,
        "inputs": {"crops": {"dtype": "uint8", "shape": ["batch", "crops", int(data.crop_size),
                                                         int(data.crop_size), 3],
                             "channels": "RGB, 0-255"}},
        "outputs": {"score": "float32 [batch]: mean over the image's crops",
                    "crop_scores": "float32 [batch, crops]"},
        "preprocessing": {
            "decode": "PIL, EXIF orientation applied, converted to RGB (alpha dropped)",
            "max_pixels": image_lib.DEFAULT_MAX_PIXELS,
            "decode_draft": bool(data.decode_draft),
            "resize": resize,
            "resize_rule": "[h, w]: exactly that; an int: the shorter side; null: as is; "
                           "then upscaled (aspect kept) if smaller than the crop; PIL bilinear",
            "crop_size": int(data.crop_size),
            "protocol": "grid",
            "num_crops": int(num_crops or data.test_crops),
        },
        "scores": {
            "higher_is_better": True,
            "units": "the training labels' units",
            "data_set": str(data.name),
            "label": str(data.label) or "the data set's default label column",
            "label_mean_std": list(ckpt.label_stats),
        },
        "model": {"backbone": str(m.backbone), "multi_scale": bool(m.multi_scale),
                  "attention": str(m.attention), "dtype": dtype,
                  "parameters": int(sum(np.size(x) for x in
                                        jax.tree.leaves(ckpt.variables["params"])))},
        "training": {"checkpoint": ckpt.source, "step": ckpt.step,
                     "metrics": ckpt.meta.get("metrics"),
                     "commit": ckpt.meta.get("commit")},
        "export": {"jax_version": jax.__version__, "jaxlib_version": _jaxlib_version(),
                   "platforms": list(platforms),
                   "exported_at": datetime.datetime.now(datetime.UTC).isoformat(
                       timespec="seconds"),
                   "code_commit": source_commit(),
                   "compatibility": "loadable by JAX releases up to 6 months newer than "
                                    "jax_version (and 3 weeks older); re-export to renew"},
    }


def export_checkpoint(checkpoint, out, *, platforms=PLATFORMS, dtype="float32", num_crops=None):
    """Writes scoring.jax, weights.npz and model.json for `checkpoint` into `out`; returns
    the model card (model.json's content)."""
    from hyperiqa_jax import checkpointing, models

    ckpt = checkpointing.load_for_inference(checkpoint)
    config = ckpt.config
    config.model.dtype = dtype  # fixed for every platform, not "auto" for this host
    model = models.build_model(config.model)
    exported = export_scoring(model, ckpt.variables, int(config.data.crop_size),
                              ckpt.label_stats, platforms)
    card = model_card(ckpt, dtype=dtype, platforms=platforms, num_crops=num_crops)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / FUNCTION_FILE, lambda f: f.write(exported.serialize()))
    _write_atomic(out / WEIGHTS_FILE, lambda f: np.savez(f, **flat_weights(ckpt.variables)))
    _write_atomic(out / META_FILE,
                  lambda f: f.write((json.dumps(card, indent=2) + "\n").encode("utf-8")))
    return card


def _write_atomic(path, write):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
    os.replace(tmp, path)


def source_commit():
    """The git commit of this package's checkout ('+dirty' with local changes), or None."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) if commit else None


def _jaxlib_version():
    from importlib import metadata

    try:
        return metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return None


def main(argv):
    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if not FLAGS.checkpoint or not FLAGS.out:
        raise app.UsageError("--checkpoint and --out are required")
    platforms = [p for p in FLAGS.platforms if p]
    unknown = sorted(set(platforms) - set(PLATFORMS))
    if unknown or not platforms:
        raise ConfigError(f"--platforms={','.join(FLAGS.platforms)}: choose from "
                          f"{', '.join(PLATFORMS)}")
    if FLAGS.num_crops is not None and FLAGS.num_crops < 1:
        raise ConfigError(f"--num_crops={FLAGS.num_crops} must be at least 1")
    if os.path.isfile(FLAGS.out):
        raise UserError(f"--out {FLAGS.out} is a file; give a folder, e.g. model_dir/")
    card = export_checkpoint(FLAGS.checkpoint, FLAGS.out, platforms=platforms,
                             dtype=FLAGS.dtype, num_crops=FLAGS.num_crops)
    size = sum(os.path.getsize(os.path.join(FLAGS.out, f))
               for f in (FUNCTION_FILE, WEIGHTS_FILE, META_FILE)) / 2**20
    print(f"exported {card['training']['checkpoint']} to {FLAGS.out} ({size:.1f} MiB; "
          f"{', '.join(platforms)}; JAX {jax.__version__}); score images with "
          f"`python hyperiqa_jax/exported.py {FLAGS.out} IMAGE...`; higher scores = better "
          "quality", file=sys.stderr)


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)

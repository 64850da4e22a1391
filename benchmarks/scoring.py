r"""Scoring throughput: a folder of KonIQ-sized JPEGs, batched against one image at a time.

    python -m benchmarks.scoring --json scoring.json            # Swin-T E6, 200 images
    python -m benchmarks.scoring --model micro --num_images 50  # a quick look
    python -m benchmarks.scoring --checkpoint runs/tiny --images /data/photos --json out.json

One run does everything, in this order:

1. images: `--num_images` photo-like JPEGs of `--image_size` (KonIQ-10k's
   1024x768) at `--jpeg_quality` 90, generated deterministically (multi-scale
   colour noise, shapes, then blur or noise of four strengths), or the first
   `--num_images` image files of `--images DIR` (in the predict CLI's order);
2. a checkpoint: `--checkpoint` (a training workdir), or one made here, in a
   child process, by `hyperiqa_jax.train.train_and_evaluate` for
   `--train_steps` steps on a small generated manifest data set (model
   `--model`, crop 224 but for `nano`, grid crops, `data.test_crops` of the
   config);
3. the predict CLI, `python -m hyperiqa_jax.predict --checkpoint CKPT FOLDER`
   in a subprocess, end to end: interpreter start, imports, checkpoint
   restore, compilation, decoding, scoring, CSV. The time to its first CSV row
   (start-up plus the first batch) and the rate after it are reported too;
4. `QualityModel.from_checkpoint(...).score(paths)` in this process: loading
   and the first call (compilation) reported apart, then whole passes over the
   folder;
5. a one-image-at-a-time JAX loop, the way pyiqa scores a folder: for each
   file, decode and preprocess it, run the model on its crops (one call), read
   the score back;
6. the work apart: decoding and cropping every file, and the model alone on
   crops already in memory (those of the first 8 images), one image per call
   and `--batch_size` rows per call. A scorer of the same crops cannot beat
   the model's own time, so the JAX loop's time per image over the model's
   alone bounds what batching can gain on this machine (the "ceiling" ratio);
7. the same loop with the PyTorch reference
   (weights_conversion/torch_reference.py) holding the checkpoint's weights,
   on the very same crops, with as many threads as there are CPUs: the
   PyTorch baseline. Its scores are compared with the JAX loop's, a float32
   sanity check of the whole comparison.

Each in-process timing (4-7) runs whole passes over the folder, after its
warm-up, until at least `--min_seconds` have passed; the predict CLI gets the
folder as often as that takes on its command line. Reported per method:
images, seconds, images/s (= images / seconds); ratios of the predict CLI and
of QualityModel.score to both one-image loops; the goal is predict >= 3x the
JAX one-image loop on a 2-core CPU. `--json FILE` also records the machine,
package versions and the command. Scores are in the checkpoint's label units
(higher = better).

The default scores 4 x 200 x 20 crops of Swin-T: about 20 minutes on a quiet
2-core machine (--model micro: a few). Measure on a quiet machine: with as many
torch threads as cores, the PyTorch loop slows down many times over as soon as
another process holds a core.
"""

import csv
import io
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image, ImageDraw, ImageFilter

from hyperiqa_jax import config_defaults

REPO = Path(__file__).resolve().parents[1]
MODELS = ("nano", "micro", "tiny", "small", "base")
GOAL_PREDICT_VS_JAX_LOOP = 3.0
WORK_IMAGES = 8  # images whose crops are held in memory to time the model alone
WORK_RUNS = ("decode_only", "model_only_one_image", "model_only_batched")  # the work apart
# Rows of the predict CLI's CSV that arrive within this many seconds of each other
# left the model in one batch (the CLI writes a batch's rows at once).
SAME_BATCH_S = 0.005

FLAGS = flags.FLAGS


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    flags.DEFINE_integer("num_images", 200, "Images to score (with --images: at most this "
                         "many of the folder's, the first in the predict CLI's order).")
    flags.DEFINE_string("image_size", "1024x768", "WIDTHxHEIGHT of the generated JPEGs "
                        "(KonIQ-10k's size).")
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the generated images.")
    flags.DEFINE_string("images", None, "Score the image files in this folder instead of "
                        "generated ones.")
    flags.DEFINE_string("checkpoint", None, "Training workdir (or best/ or a step folder) to "
                        "score with. Default: train --model for --train_steps steps here.")
    flags.DEFINE_enum("model", "tiny", MODELS,
                      "Model of the checkpoint made here: tiny/small/base = configs/<name>.py "
                      "(E6 with a Swin-T/S/B backbone, 224-px crops, 20 crops per image); "
                      "micro = tiny with a narrow one-block-per-stage Swin "
                      "(benchmarks/throughput.py); nano = 56-px crops of an 8-wide Swin, "
                      "4 crops per image, for smoke tests only.")
    flags.DEFINE_integer("train_steps", 4, "Training steps of the checkpoint made here.")
    flags.DEFINE_integer("batch_size", 64, "Crops per model call of predict / QualityModel.")
    flags.DEFINE_integer("num_crops", None, "Crops per image (default: the checkpoint's "
                         "data.test_crops).")
    flags.DEFINE_enum("protocol", "grid", ["grid", "center", "random"], "Crop placement.")
    flags.DEFINE_float("min_seconds", 10.0, "Each timing runs whole passes over the folder "
                       "until at least this long (one pass at least).")
    flags.DEFINE_bool("predict_cli", True, "Time the predict CLI (--nopredict_cli: skip).")
    flags.DEFINE_bool("torch", True, "Time the PyTorch reference (--notorch: skip).")
    flags.DEFINE_integer("torch_threads", 0, "torch CPU threads (0: os.cpu_count(), the "
                         "CPUs JAX uses).")
    flags.DEFINE_string("workdir", None, "Folder for the generated images, the checkpoint and "
                        "the CLI's CSV; kept and reused by the next run (default: a temporary "
                        "folder, removed at the end).")
    flags.DEFINE_string("json", None, "Write every number, the machine, versions and the "
                        "command to this JSON file.")


# ---------------------------------------------------------------------------- images

def make_image(width, height, seed, level=None):
    """A photo-like uint8 [height, width, 3] image, the same for the same arguments.

    Colour noise summed over octaves (amplitude halving per octave, like natural
    images' 1/f spectrum), a few dozen filled shapes, then one of four
    degradations by `level` (default seed % 4): none, blur, noise, blur + noise.
    """
    rng = np.random.default_rng([seed, width, height])
    level = seed % 4 if level is None else level
    field = np.zeros((height, width, 3), np.float32)
    cells, amplitude = 3, 1.0
    while cells <= min(width, height) // 4:
        coarse = rng.integers(0, 256, (cells * height // width + 2, cells + 2, 3), np.uint8)
        up = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        field += amplitude * (np.asarray(up, np.float32) - 128)
        cells, amplitude = cells * 2, amplitude / 2
    base = np.clip(128 + field / 1.6, 0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img, "RGBA")
    for _ in range(int(rng.integers(15, 40))):
        x0, y0 = rng.uniform(-0.1, 1.0) * width, rng.uniform(-0.1, 1.0) * height
        w, h = rng.uniform(0.02, 0.4) * width, rng.uniform(0.02, 0.4) * height
        colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(90, 256)),)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            points = [(x0 + rng.uniform(0, w), y0 + rng.uniform(0, h)) for _ in range(5)]
            draw.polygon(points, fill=colour)
    if level in (1, 3):
        img = img.filter(ImageFilter.GaussianBlur(radius=1.0 + 1.5 * float(rng.uniform())))
    out = np.asarray(img, np.float32)
    if level in (2, 3):
        out = out + rng.normal(0, 12, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def write_images(folder, num, width, height, quality, seed=0):
    """`num` JPEGs img_00000.jpg... in `folder` (existing files are kept); returns the paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(num):
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        if not os.path.isfile(path):
            Image.fromarray(make_image(width, height, seed + i)).save(path, quality=quality)
        paths.append(path)
    return paths


# ---------------------------------------------------------------------------- checkpoint

def model_config(name):
    """The config of a checkpoint made here: configs/tiny.py and friends, or shrunk ones."""
    config = config_defaults.reference_config(name if name in ("tiny", "small", "base")
                                              else "tiny")
    if name == "micro":
        from benchmarks.throughput import MICRO_BACKBONE

        config.model.backbone_overrides.update(MICRO_BACKBONE)
    elif name == "nano":  # tests/train_utils.py's tiny_config, on the E6 heads
        m = config.model
        m.img_size = 56
        m.backbone_overrides.update(embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 2),
                                    patch_size=1, window_size=7)
        with m.unlocked():
            m.hyper_feature_widths = (16, 16)
        m.hyper_in_channels = 16
        m.target_in_size = 98
        m.target_fc_sizes = (14, 7, 7, 7)
        config.data.crop_size = 56
        config.data.test_crops = 4
    config.data.eval_protocol = "grid"
    return config


def make_checkpoint(workdir, name, steps, seed=0):
    """Trains `name` for `steps` steps on a generated manifest data set; returns the workdir.

    Labels fall with the images' degradation level, are standardised for the
    loss (so the checkpoint's label_mean_std is not the identity) and the
    learning rate is raised, so a few steps move the weights. A workdir that
    already holds the run resumes at its last step, i.e. does nothing.
    """
    from hyperiqa_jax import train

    root = os.path.join(workdir, "train_data")
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    n_train, n_test = 16, 4
    rows = []
    for i in range(n_train + n_test):
        rel = os.path.join("images", f"train_{i:03d}.jpg")
        if not os.path.isfile(os.path.join(root, rel)):
            Image.fromarray(make_image(320, 240, 10_000 + seed + i)).save(
                os.path.join(root, rel), quality=90)
        level = (10_000 + seed + i) % 4
        rows.append(f"{rel},{80.0 - 12 * level + (i % 3):.1f},"
                    f"{'train' if i < n_train else 'test'}")
    Path(root, "manifest.csv").write_text("path,score,split\n" + "\n".join(rows) + "\n")

    config = model_config(name)
    config.seed = seed
    d, t = config.data, config.train
    d.name, d.root = "manifest", root
    t.batch_size = 8
    t.eval_batch_size = 8
    t.epochs = 1000
    t.max_steps = steps
    t.lr, t.lr_ratio = 1e-4, 10.0
    t.standardize_labels = True
    t.eval_every_epochs = 0
    t.final_eval = False
    t.patience = 0
    t.log_every_steps = max(1, steps)
    out = os.path.join(workdir, f"checkpoint_{name}")
    train.train_and_evaluate(config, out)
    return out


def make_checkpoint_in_subprocess(workdir, name, steps):
    """`make_checkpoint` in a child process, so that nothing of training (input threads,
    compiled programs, memory) stays behind in the process that is timed next."""
    code = ("import sys; from benchmarks.scoring import make_checkpoint; "
            "print(make_checkpoint(sys.argv[1], sys.argv[2], int(sys.argv[3])))")
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code, str(workdir), name, str(steps)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"training the {name} checkpoint failed (status {proc.returncode}; "
                           "its output is above)")
    *summary, path = proc.stdout.strip().splitlines()
    print("\n".join(summary), flush=True)  # training's run summary
    return path


# ---------------------------------------------------------------------------- weights

def reference_state_dict(variables, reference, model_config):
    """State dict of the PyTorch reference `reference` holding the JAX `variables`, exactly.

    weights_conversion.hyperiqa converts reference state dicts to JAX variables
    (renames, transposes). This inverts it without restating its rules: each
    float element of the reference's state dict is numbered, the numbers are
    converted like weights (in two float32-exact halves), and each JAX value goes
    back to the element whose number it carries. Buffers the conversion ignores
    (index tables, counters) keep the reference's values. Raises ValueError when
    an element gets no value; the caller checks the round trip.
    """
    import torch
    from flax import traverse_util

    from weights_conversion import hyperiqa as conversion

    template = reference.state_dict()
    floats = {k: v for k, v in template.items()
              if v.is_floating_point() and not conversion.IGNORED.search(k)}
    offsets, total = {}, 0
    for key, value in floats.items():
        offsets[key] = total
        total += value.numel()
    if total >= 2 ** 36:
        raise ValueError(f"{total} elements: too many to number exactly in two float32 halves")

    def numbered(shift, mask):
        state = {k: ((np.arange(offsets[k], offsets[k] + v.numel(), dtype=np.int64) >> shift)
                     & mask).astype(np.float32).reshape(tuple(v.shape))
                 for k, v in floats.items()}
        return traverse_util.flatten_dict(
            conversion.convert_state_dict(state, model_config, "reference"))

    high, low = numbered(12, (1 << 24) - 1), numbered(0, (1 << 12) - 1)
    values = np.zeros(total, np.float32)
    filled = np.zeros(total, bool)
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        if path not in high:
            raise ValueError(f"the JAX variable {'/'.join(path)} has no place in the reference")
        index = (high[path].astype(np.int64) << 12) | low[path].astype(np.int64)
        values[index.ravel()] = np.asarray(value, np.float32).ravel()
        filled[index.ravel()] = True
    if not filled.all():
        empty = [k for k in floats if not filled[offsets[k]:offsets[k] + floats[k].numel()].all()]
        raise ValueError(f"reference entries without a JAX value: {empty[:10]}")
    state = dict(template)
    for key, value in floats.items():
        chunk = values[offsets[key]:offsets[key] + value.numel()]
        state[key] = torch.from_numpy(chunk.reshape(tuple(value.shape)).copy())
    return state


def torch_reference(variables, model_config):
    """HyperIQAReference (eval mode) holding `variables`; checks the round trip is exact."""
    import copy

    from flax import traverse_util

    from weights_conversion import hyperiqa as conversion
    from weights_conversion.torch_reference import HyperIQAReference

    model_config = copy.deepcopy(model_config)
    model_config.dtype = "float32"
    reference = HyperIQAReference(model_config)
    state = reference_state_dict(variables, reference, model_config)
    reference.load_state_dict(state)
    back = traverse_util.flatten_dict(conversion.convert_state_dict(
        reference.state_dict(), model_config, "reference"))
    for path, value in traverse_util.flatten_dict(dict(variables)).items():
        if not np.array_equal(np.asarray(value, np.float32), back[path]):
            raise AssertionError(f"{'/'.join(path)} differs after JAX -> torch -> JAX")
    return reference.eval()


# ---------------------------------------------------------------------------- timing

def timed_passes(score_all, count, min_seconds):
    """Calls score_all() (one pass over `count` images) until min_seconds have passed.

    Returns (timing dict, the first pass's scores).
    """
    seconds, first = [], None
    while not seconds or sum(seconds) < min_seconds:
        start = time.perf_counter()
        scores = score_all()
        seconds.append(time.perf_counter() - start)
        first = scores if first is None else first
    total = sum(seconds)
    return {"images": count * len(seconds), "seconds": total,
            "images_per_s": count * len(seconds) / total, "passes": len(seconds),
            "pass_seconds": seconds}, np.asarray(first, np.float64)


def run_predict_cli(checkpoint, targets, count, out_csv, *, repeats, batch_size, protocol,
                    num_crops):
    """The predict CLI over `targets` (given `repeats` times); (timing dict, scores of pass 1).

    Its CSV goes to stdout unbuffered, so each row is time-stamped on arrival:
    the first row's time is start-up + compilation + the first batch.
    """
    command = [sys.executable, "-m", "hyperiqa_jax.predict", "--checkpoint", str(checkpoint),
               "--batch_size", str(batch_size), "--protocol", protocol]
    if num_crops:
        command += ["--num_crops", str(num_crops)]
    command += [str(t) for t in targets] * repeats
    env = dict(os.environ, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    stamps, lines = [], []
    with tempfile.TemporaryFile("w+") as stderr:
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=stderr, text=True)
        for line in proc.stdout:
            stamps.append(time.perf_counter() - start)
            lines.append(line)
        status = proc.wait()
        wall = time.perf_counter() - start
        stderr.seek(0)
        errors = stderr.read()
    if status != 0:
        raise RuntimeError(f"the predict CLI exited with status {status}:\n{errors[-3000:]}")
    Path(out_csv).write_text("".join(lines))
    rows = list(csv.DictReader(io.StringIO("".join(lines))))
    if len(rows) != count * repeats:
        raise RuntimeError(f"the predict CLI wrote {len(rows)} rows for {count * repeats} images")
    rows_t = stamps[1:]  # after the header
    first = rows_t[0]
    in_first_batch = sum(1 for t in rows_t if t - first <= SAME_BATCH_S)
    after = rows_t[-1] - first
    timing = {"images": len(rows), "seconds": wall, "images_per_s": len(rows) / wall,
              "passes": repeats, "time_to_first_score_s": first,
              "images_in_first_batch": in_first_batch,
              "after_first_batch_images_per_s":
                  (len(rows) - in_first_batch) / after if len(rows) > in_first_batch else None,
              "command": shlex.join(["python", *command[1:]]) + f" > {out_csv}"}
    return timing, np.array([float(r["score"]) for r in rows[:count]], np.float64)


def machine_info():
    import jax

    device = jax.devices()[0]
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "jax_backend": jax.default_backend(),
            "jax_device": device.device_kind, "jax_devices": jax.device_count()}
    if hasattr(os, "sched_getaffinity"):
        info["cpus_usable"] = len(os.sched_getaffinity(0))
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        info["cpu_model"] = names[0] if names else None
    except OSError:
        pass
    info["ld_preload"] = os.environ.get("LD_PRELOAD", "")
    return info


def versions():
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy", "pillow", "torch", "timm", "orbax-checkpoint"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        out["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, text=True,
                                       capture_output=True, timeout=30).stdout.strip() or None
        out["tree_dirty"] = bool(subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, text=True,
            capture_output=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        out["commit"] = out["tree_dirty"] = None
    return out


def _ratio(a, b):
    return a["images_per_s"] / b["images_per_s"] if a and b else None


def _max_diff(a, b):
    return float(np.max(np.abs(a - b))) if a is not None and b is not None else None


# ---------------------------------------------------------------------------- main

def benchmark(workdir):
    """Runs everything; returns the result dict."""
    import jax

    from hyperiqa_jax import predict
    from hyperiqa_jax.data import image as image_lib
    from hyperiqa_jax.scoring import QualityModel, predict_scores

    width, height = (int(x) for x in FLAGS.image_size.lower().split("x"))
    loadavg_start = os.getloadavg()
    result = {"command": shlex.join(["python", "-m", "benchmarks.scoring", *sys.argv[1:]]),
              "machine": machine_info(), "versions": versions()}

    # 1. The images.
    start = time.perf_counter()
    if FLAGS.images:
        found = predict.expand_paths([FLAGS.images])
        if not found:
            raise app.UsageError(f"--images {FLAGS.images}: no image files there")
        paths = found[:FLAGS.num_images]
        targets = [FLAGS.images] if len(paths) == len(found) else paths
    else:
        folder = os.path.join(workdir, f"images_{width}x{height}_q{FLAGS.jpeg_quality}")
        paths = write_images(folder, FLAGS.num_images, width, height, FLAGS.jpeg_quality)
        if len(predict.expand_paths([folder])) != len(paths):  # a kept folder with more
            targets = paths
        else:
            targets = [folder]
    count = len(paths)
    sizes = set()
    for path in paths[:20]:
        with Image.open(path) as img:
            sizes.add(img.size)
    sizes = sorted(sizes)
    result["images"] = {"folder": FLAGS.images or folder, "count": count,
                        "generated": not FLAGS.images, "seconds": time.perf_counter() - start,
                        "sizes_of_first_20": [list(s) for s in sizes],
                        "megabytes": sum(os.path.getsize(p) for p in paths) / 2 ** 20}
    print(f"{count} images ready ({result['images']['seconds']:.1f} s)", flush=True)

    # 2. The checkpoint.
    start = time.perf_counter()
    checkpoint = FLAGS.checkpoint or make_checkpoint_in_subprocess(workdir, FLAGS.model,
                                                                   FLAGS.train_steps)
    result["checkpoint"] = {"path": str(checkpoint), "made_here": not FLAGS.checkpoint,
                            "model": None if FLAGS.checkpoint else FLAGS.model,
                            "train_steps": None if FLAGS.checkpoint else FLAGS.train_steps,
                            "seconds": time.perf_counter() - start}
    print(f"checkpoint {checkpoint} ({result['checkpoint']['seconds']:.1f} s)", flush=True)

    runs, scores = {}, {}
    # 3. The predict CLI, first: nothing of ours has run in this process yet but imports.
    if FLAGS.predict_cli:
        out_csv = os.path.join(workdir, "predict.csv")
        kwargs = dict(batch_size=FLAGS.batch_size, protocol=FLAGS.protocol,
                      num_crops=FLAGS.num_crops)
        runs["predict_cli"], scores["predict_cli"] = run_predict_cli(
            checkpoint, targets, count, out_csv, repeats=1, **kwargs)
        if runs["predict_cli"]["seconds"] < FLAGS.min_seconds:
            repeats = math.ceil(FLAGS.min_seconds / runs["predict_cli"]["seconds"]) + 1
            runs["predict_cli"], _ = run_predict_cli(checkpoint, targets, count, out_csv,
                                                     repeats=repeats, **kwargs)
        print(f"predict CLI: {runs['predict_cli']['images_per_s']:.2f} images/s", flush=True)

    # 4. QualityModel.score in this process.
    start = time.perf_counter()
    model = QualityModel.from_checkpoint(checkpoint, batch_size=FLAGS.batch_size,
                                         protocol=FLAGS.protocol, num_crops=FLAGS.num_crops)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    model.score(paths[:1])
    warmup_s = time.perf_counter() - start
    runs["quality_model"], scores["quality_model"] = timed_passes(
        lambda: model.score(paths), count, FLAGS.min_seconds)
    runs["quality_model"].update(load_s=load_s, warmup_s=warmup_s)
    print(f"QualityModel.score: {runs['quality_model']['images_per_s']:.2f} images/s",
          flush=True)

    config = model.config
    num_crops = model.num_crops
    mean, std = model.label_stats
    crop_size = int(config.data.crop_size)
    result["settings"] = {
        "num_images": FLAGS.num_images, "image_size": [width, height],
        "jpeg_quality": FLAGS.jpeg_quality, "backbone": config.model.backbone,
        "backbone_overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in
                               dict(config.model.backbone_overrides).items()},
        "crop_size": crop_size, "resize": list(config.data.resize or []) or None,
        "num_crops": num_crops, "protocol": FLAGS.protocol, "batch_size": FLAGS.batch_size,
        "jax_compute_dtype": str(config.model.dtype) if config.model.dtype != "auto" else
        ("float32" if jax.default_backend() == "cpu" else "bfloat16"),
        "label_mean_std": [mean, std], "min_seconds": FLAGS.min_seconds}

    def crops(path):  # uint8, the evaluation crops (`eval_crops`) of the checkpoint's config
        return model.crops(path)

    # 5. One image at a time, JAX (the scoring forward: normalise, model, label units).
    net, variables = model.model, model.variables
    forward = jax.jit(lambda v, x: predict_scores(net, v, x, (0.0, 1.0))[0])

    def jax_one(path):
        return float(np.mean(np.asarray(forward(variables, crops(path)), np.float64))) * std + mean

    start = time.perf_counter()
    jax_one(paths[0])
    warmup_s = time.perf_counter() - start
    runs["jax_per_image"], scores["jax_per_image"] = timed_passes(
        lambda: [jax_one(p) for p in paths], count, FLAGS.min_seconds)
    runs["jax_per_image"]["warmup_s"] = warmup_s
    print(f"JAX one image at a time: {runs['jax_per_image']['images_per_s']:.2f} images/s",
          flush=True)

    # 6. The work every scorer of these crops does, timed apart: decoding and cropping, and
    # the model alone on crops already in memory, one image per call and `--batch_size` rows
    # per call. Scoring an image cannot take less than the model's time on its crops, so
    # loop time / model time bounds what any batching can gain over the loop.
    runs["decode_only"], _ = timed_passes(lambda: [len(crops(p)) for p in paths], count,
                                          FLAGS.min_seconds)
    held = [crops(p) for p in paths[:WORK_IMAGES]]
    runs["model_only_one_image"], _ = timed_passes(
        lambda: [np.asarray(forward(variables, x)).sum() for x in held], len(held),
        FLAGS.min_seconds)
    rows = np.concatenate(held * -(-FLAGS.batch_size // (len(held) * num_crops)))
    rows = rows[:FLAGS.batch_size]
    np.asarray(forward(variables, rows))  # compile the batch shape
    runs["model_only_batched"], _ = timed_passes(
        lambda: np.asarray(forward(variables, rows)).sum(), len(rows) / num_crops,
        FLAGS.min_seconds)
    for name in WORK_RUNS:
        print(f"{LABELS[name]}: {runs[name]['images_per_s']:.2f} images/s", flush=True)

    # 7. One image at a time, PyTorch reference (last: its threads may spin after use).
    # The reference builds timm's Swin: a backbone with the demo's own stem (stem_channels,
    # patch_norm=False) has no PyTorch counterpart, so that comparison is skipped.
    from benchmarks.throughput import jax_only_overrides

    unsupported = jax_only_overrides(config.model)
    if FLAGS.torch and unsupported:
        result["torch_skipped"] = (f"the PyTorch reference has no counterpart of the "
                                   f"backbone overrides {unsupported}")
        print(f"PyTorch loop skipped: {result['torch_skipped']}", flush=True)
    if FLAGS.torch and not unsupported:
        import torch

        threads = FLAGS.torch_threads or os.cpu_count()
        torch.set_num_threads(threads)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        start = time.perf_counter()
        reference = torch_reference(jax.device_get(variables), config.model).to(device)
        build_s = time.perf_counter() - start

        def torch_one(path):
            x = torch.from_numpy(image_lib.normalize(crops(path))).permute(0, 3, 1, 2).to(device)
            with torch.inference_mode():
                return float(reference(x)["score"].double().mean()) * std + mean

        start = time.perf_counter()
        torch_one(paths[0])
        warmup_s = time.perf_counter() - start
        runs["torch_per_image"], scores["torch_per_image"] = timed_passes(
            lambda: [torch_one(p) for p in paths], count, FLAGS.min_seconds)
        runs["torch_per_image"].update(build_s=build_s, warmup_s=warmup_s, threads=threads,
                                       device=device)
        print(f"PyTorch one image at a time: {runs['torch_per_image']['images_per_s']:.2f} "
              "images/s", flush=True)

    get = runs.get
    result["runs"] = runs
    result["ratios"] = {
        "predict_cli_vs_jax_per_image": _ratio(get("predict_cli"), get("jax_per_image")),
        "predict_cli_vs_torch_per_image": _ratio(get("predict_cli"), get("torch_per_image")),
        "quality_model_vs_jax_per_image": _ratio(get("quality_model"), get("jax_per_image")),
        "quality_model_vs_torch_per_image": _ratio(get("quality_model"),
                                                   get("torch_per_image")),
        "jax_per_image_vs_torch_per_image": _ratio(get("jax_per_image"),
                                                   get("torch_per_image")),
        # The most any scorer of the same crops can gain over the JAX loop on this machine:
        # the loop's time per image over the model's alone at its best batch.
        "ceiling_vs_jax_per_image": _ratio(
            max(runs["model_only_one_image"], runs["model_only_batched"],
                key=lambda r: r["images_per_s"]), get("jax_per_image")),
        "model_batched_vs_one_image": _ratio(get("model_only_batched"),
                                             get("model_only_one_image")),
    }
    ratio = result["ratios"]["predict_cli_vs_jax_per_image"]
    result["goal"] = {"predict_cli_vs_jax_per_image": GOAL_PREDICT_VS_JAX_LOOP,
                      "met": None if ratio is None else ratio >= GOAL_PREDICT_VS_JAX_LOOP}
    reference_scores = scores["jax_per_image"]
    result["scores"] = {
        "mean": float(reference_scores.mean()), "std": float(reference_scores.std()),
        "min": float(reference_scores.min()), "max": float(reference_scores.max()),
        "max_abs_diff_jax_vs_torch": _max_diff(reference_scores, scores.get("torch_per_image")),
        "max_abs_diff_quality_model_vs_jax_per_image": _max_diff(scores["quality_model"],
                                                                 reference_scores),
        # The CLI's CSV rounds to 4 decimals.
        "max_abs_diff_predict_cli_vs_quality_model": _max_diff(scores.get("predict_cli"),
                                                               scores["quality_model"]),
        "per_image": {k: v.tolist() for k, v in scores.items()},
        "paths": [os.path.relpath(p, result["images"]["folder"]) for p in paths],
    }
    result["machine"]["loadavg_start"] = list(loadavg_start)
    result["machine"]["loadavg_end"] = list(os.getloadavg())
    return result


LABELS = {"predict_cli": "predict CLI (end to end)", "quality_model": "QualityModel.score",
          "jax_per_image": "JAX, one image at a time",
          "decode_only": "decode and crop only",
          "model_only_one_image": "model only, one image per call",
          "model_only_batched": "model only, batch_size rows",
          "torch_per_image": "PyTorch, one image at a time"}


def format_table(result):
    s, m = result["settings"], result["machine"]
    lines = [
        f"{result['images']['count']} images of {s['image_size'][0]}x{s['image_size'][1]}, "
        f"{s['backbone']}, {s['num_crops']} {s['protocol']} crops of {s['crop_size']} px, "
        f"batch {s['batch_size']}, {s['jax_compute_dtype']}, {m['cpu_count']} CPUs "
        f"({m.get('cpu_model') or m['processor']}), load average {m['loadavg_start'][0]:.1f}",
        f"{'method':<32} {'images':>7} {'seconds':>9} {'images/s':>9}  start-up (not in images/s"
        " unless end to end)"]
    for key, label in LABELS.items():
        run = result["runs"].get(key)
        if run is None:
            continue
        if key == "predict_cli":
            extra = f"first score after {run['time_to_first_score_s']:.1f} s"
            if run["after_first_batch_images_per_s"]:
                extra += f", then {run['after_first_batch_images_per_s']:.2f} images/s"
        elif key == "quality_model":
            extra = f"load {run['load_s']:.1f} s, first call {run['warmup_s']:.1f} s"
        elif key in WORK_RUNS:
            extra = "the work apart"
        elif key == "torch_per_image":
            extra = (f"build {run['build_s']:.1f} s, first image {run['warmup_s']:.2f} s, "
                     f"{run['threads']} threads")
        else:
            extra = f"first image {run['warmup_s']:.1f} s"
        lines.append(f"{label:<32} {run['images']:>7.0f} {run['seconds']:>9.2f} "
                     f"{run['images_per_s']:>9.2f}  {extra}")
    lines.append("ratios (images/s):")
    for key, value in result["ratios"].items():
        if value is not None:
            goal = ""
            if key == "predict_cli_vs_jax_per_image":
                goal = (f"  (goal >= {GOAL_PREDICT_VS_JAX_LOOP:g}: "
                        f"{'met' if result['goal']['met'] else 'not met'})")
            lines.append(f"  {key:<36} {value:6.2f}{goal}")
    sc = result["scores"]
    lines.append(f"scores: mean {sc['mean']:.3f}, std {sc['std']:.3f}, range "
                 f"{sc['min']:.3f}..{sc['max']:.3f}")
    for key in ("max_abs_diff_jax_vs_torch", "max_abs_diff_quality_model_vs_jax_per_image",
                "max_abs_diff_predict_cli_vs_quality_model"):
        if sc[key] is not None:
            lines.append(f"  {key:<44} {sc[key]:.2e}")
    return "\n".join(lines)


def main(argv):
    from hyperiqa_jax.logs import quiet_library_logs

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    if FLAGS.num_images < 1 or FLAGS.train_steps < 1 or FLAGS.batch_size < 1:
        raise app.UsageError("--num_images, --train_steps and --batch_size must be at least 1")
    try:
        width, height = (int(x) for x in FLAGS.image_size.lower().split("x"))
    except ValueError:
        raise app.UsageError(f"--image_size {FLAGS.image_size}: give WIDTHxHEIGHT, "
                             "e.g. 1024x768") from None
    if min(width, height) < 32:
        raise app.UsageError("--image_size: at least 32x32")
    if FLAGS.images and not os.path.isdir(FLAGS.images):
        raise app.UsageError(f"--images {FLAGS.images}: not a folder")
    if FLAGS.json and not os.path.isdir(os.path.dirname(os.path.abspath(FLAGS.json))):
        raise app.UsageError(f"--json {FLAGS.json}: its folder does not exist")
    quiet_library_logs()
    workdir = FLAGS.workdir or tempfile.mkdtemp(prefix="scoring_bench_")
    os.makedirs(workdir, exist_ok=True)
    try:
        result = benchmark(workdir)
    finally:
        if not FLAGS.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    print(format_table(result))
    if FLAGS.json:
        Path(FLAGS.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {FLAGS.json}")
    return 0


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)

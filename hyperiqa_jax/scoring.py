"""Scoring images with a trained checkpoint: the `QualityModel` Python API.

    from hyperiqa_jax import QualityModel
    model = QualityModel.from_checkpoint("runs/demo")   # a workdir, best/, or a step folder
    scores = model.score(["a.jpg", "b.png", some_uint8_array])

Scores are on the label scale of the training set, higher = better quality
(KonIQ-10k MOS: 0-100; the demo's SSIM x 100: 0-100). An image's score is the
mean over its crops; by default crops sit on a fixed grid (deterministic), as
many per image as the run's `data.test_crops`, after the run's resize.
Crops of many images are batched together to fill the devices.
"""

import concurrent.futures
import itertools
import os
from collections.abc import Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from hyperiqa_jax import checkpointing, optim
from hyperiqa_jax.cli import UserError
from hyperiqa_jax.data import image as image_lib

SCORE_DIRECTION = "higher is better"


class QualityModel:
    """A trained model plus its preprocessing; `score` maps images to quality scores."""

    def __init__(self, model, variables, config, label_stats=(0.0, 1.0), *, batch_size=64,
                 protocol="grid", num_crops=None, num_workers=None, source=None):
        self.model = model
        self.config = config
        self.label_stats = tuple(float(x) for x in label_stats)
        self.protocol = protocol
        self.num_crops = 1 if protocol == "center" else int(num_crops or config.data.test_crops)
        self.num_workers = num_workers or min(8, os.cpu_count() or 1)
        self.source = source
        devices = jax.local_devices()
        # Whole batches on every local device: round the batch up to a multiple of them.
        self.batch_size = -(-int(batch_size) // len(devices)) * len(devices)
        mesh = jax.sharding.Mesh(np.array(devices), ("data",))
        self._batch_sharding = NamedSharding(mesh, P("data"))
        self.variables = jax.device_put(variables, NamedSharding(mesh, P()))
        mean, std = self.label_stats

        def forward(variables, images):
            out = model.apply(variables, images, train=False)
            attention = out.get("attention")
            score = out["score"].astype(jnp.float32) * std + mean
            return score, (attention.astype(jnp.float32) if attention is not None else None)

        self._forward = jax.jit(forward, out_shardings=NamedSharding(mesh, P()))

    @property
    def crop_size(self):
        return int(self.config.data.crop_size)

    @classmethod
    def from_checkpoint(cls, path, **kwargs):
        """Loads a training workdir (best checkpoint, else latest), best/, or a step folder."""
        from hyperiqa_jax import models

        manager_dir, step = find_checkpoint(path)
        where = f"checkpoint {manager_dir}/{step}"
        try:
            meta = checkpointing.read_meta(manager_dir, step)
        except (OSError, ValueError) as e:
            raise UserError(f"{where}: its meta item cannot be read ({_first_line(e)}); point "
                            "--checkpoint at a run written by hyperiqa_jax.train") from e
        if not {"model", "data", "train"} <= set(meta.get("config") or {}):
            raise UserError(f"{where}: its meta item holds no training config; point "
                            "--checkpoint at a run written by hyperiqa_jax.train")
        config = checkpointing.config_from_meta(meta)
        model = models.build_model(config.model)
        abstract = abstract_checkpoint_state(model, config, meta.get("state_kind", "train"))
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)
        try:
            state = checkpointing.restore_state(manager_dir, step, target)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"{where}: its parameters cannot be restored into the model its "
                            f"config describes ({_first_line(e)}); was it written by another "
                            "version of this code, or only partly?") from e
        variables = {"params": state["params"]}
        if "batch_stats" in state:
            variables["batch_stats"] = state["batch_stats"]
        return cls(model, variables, config, meta.get("label_mean_std", (0.0, 1.0)),
                   source=f"{manager_dir}/{step}", **kwargs)

    # -- preprocessing

    def crops(self, image):
        """float32 [num_crops, crop, crop, 3] normalised crops of one path / bytes / array."""
        return image_lib.preprocess_for_scoring(image, self.config.data, protocol=self.protocol,
                                                num_crops=self.num_crops, seed=0)

    # -- scoring

    def iter_scores(self, images: Iterable, *, return_attention=False) -> Iterator[tuple]:
        """Yields (index, score, error[, attention]) per input, in input order.

        A file that cannot be decoded yields score NaN and its error message
        instead of stopping the run.
        """
        images = list(images)
        pool = concurrent.futures.ThreadPoolExecutor(self.num_workers)
        # Decode a bounded number of images ahead of the device.
        ahead = max(2 * self.num_workers, 2 * -(-self.batch_size // self.num_crops))

        def load(i):
            try:
                return i, self.crops(images[i]), None
            except (image_lib.ImageDecodeError, OSError, ValueError) as e:
                return i, None, str(e)

        futures = iter(pool.submit(load, i) for i in range(len(images)))
        queue = list(itertools.islice(futures, ahead))
        pending = {}  # index -> [crops done, score sum, attention sum, count]
        buf_img, buf_idx = [], []
        done = {}
        next_out = 0

        def flush(final=False):
            if not buf_img:
                return
            rows = np.concatenate(buf_img)
            idx = np.concatenate(buf_idx)
            while len(rows) >= self.batch_size or (final and len(rows)):
                take = min(self.batch_size, len(rows))
                batch = np.zeros((self.batch_size,) + rows.shape[1:], np.float32)
                batch[:take] = rows[:take]
                score, att = self._forward(self.variables,
                                           jax.device_put(batch, self._batch_sharding))
                score = np.asarray(score)[:take]
                att = None if att is None else np.asarray(att)[:take]
                for j, i in enumerate(idx[:take]):
                    p = pending[i]
                    p[0] += score[j]
                    if att is not None:
                        p[1] = att[j] if p[1] is None else p[1] + att[j]
                    p[2] += 1
                    if p[2] == p[3]:
                        done[i] = (i, p[0] / p[3], None,
                                   None if p[1] is None else p[1] / p[3])
                        del pending[i]
                rows, idx = rows[take:], idx[take:]
            buf_img[:] = [rows] if len(rows) else []
            buf_idx[:] = [idx] if len(idx) else []

        try:
            while queue:
                i, crops, error = queue.pop(0).result()
                queue.extend(itertools.islice(futures, 1))
                if crops is None:
                    done[i] = (i, float("nan"), error, None)
                else:
                    pending[i] = [0.0, None, 0, len(crops)]
                    buf_img.append(crops)
                    buf_idx.append(np.full((len(crops),), i))
                    if sum(len(b) for b in buf_img) >= self.batch_size:
                        flush()
                if not queue:
                    flush(final=True)
                while next_out in done:
                    out = done.pop(next_out)
                    yield out if return_attention else out[:3]
                    next_out += 1
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def score(self, images, *, return_attention=False, errors="raise"):
        """Quality scores (float64 [N], higher = better) for paths, bytes or uint8 arrays.

        errors: 'raise' (default) raises ImageDecodeError for the first bad
        input; 'nan' gives NaN for it. return_attention: also return the
        per-image mean attention weights ([N, C] or [N, 4]; None without attention).
        """
        if isinstance(images, (str, os.PathLike, np.ndarray)) and not (
                isinstance(images, np.ndarray) and images.ndim == 4):
            images = [images]
        scores, attention = [], []
        for i, s, err, att in self.iter_scores(images, return_attention=True):
            if err is not None and errors == "raise":
                raise image_lib.ImageDecodeError(_name(images[i]), err)
            scores.append(s)
            attention.append(att)
        scores = np.asarray(scores, np.float64)
        if not return_attention:
            return scores
        if any(a is None for a in attention):
            return scores, None
        return scores, np.stack(attention)


def find_checkpoint(path):
    """`checkpointing.find_checkpoint`, saying what --checkpoint takes when `path` is absent."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint path {os.path.abspath(path)} does not exist; --checkpoint "
                        "takes a training workdir (e.g. runs/demo, which `make demo` writes), "
                        "its best/ or checkpoints/ folder, or one step folder")
    return checkpointing.find_checkpoint(path)


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def _name(x):
    return os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"<{type(x).__name__}>"


def abstract_checkpoint_state(model, config, kind):
    """Shapes of what a checkpoint's `state` item holds: the train state or inference variables."""
    from hyperiqa_jax import train

    tx = optim.make_optimizer(config.train, steps_per_epoch=1)  # schedule does not shape state
    state = jax.eval_shape(lambda r: train.init_state(model, tx, config, r),
                           jax.random.PRNGKey(0))
    if kind == "inference":
        return train.inference_variables(state)
    return state

r"""Training input throughput: the grain pipeline's variants, the training loop's feed, and
the PyTorch original's loader, on the same generated KonIQ-sized JPEGs.

    python -m benchmarks.input_pipeline                       # every variant, >= 10 s each
    python -m benchmarks.input_pipeline --variants=threads,processes --workers=4 --json=out.json

Every variant makes batches of 224x224 crops after a horizontal flip and
Resize((512, 384)), 20 crops per image per epoch:

- threads:      make_train_dataset, decoding in --workers threads (uint8 crops out);
- processes:    the same, decoding in --workers grain worker processes of one thread;
- float32:      threads plus the ImageNet normalisation on the host (the step does it);
- array_record: threads, reading a TFDS array_record build of the images stored
                pre-resized to 512x384 (`build_tfds(..., resize=...)`);
- loop:         threads, consumed as training consumes them (`DeviceBatches`, a
                jitted step per batch that computes almost nothing): the loop's cost;
- reference:    torch DataLoader(shuffle=True, num_workers=--workers) over every image
                listed 20 times, each sample decoding its JPEG, then flip, Resize,
                RandomCrop, ToTensor, Normalize.

Each is timed for at least --min_seconds and --min_batches after --warmup batches.
Reported: crops/s, crops/s per decoding worker, images/s (= crops/s / crops per
image), MB/s crossing to the device, and the ratio to `threads`.
"""

import json
import os
import tempfile
import time

import numpy as np
from absl import flags
from PIL import Image

from benchmarks import throughput
from hyperiqa_jax.errors import ConfigError

VARIANTS = ("threads", "processes", "float32", "array_record", "loop", "reference")
SETTINGS = ("num_images", "crop", "crops", "batch_size", "min_seconds", "min_batches",
            "warmup", "workers", "mix_images", "variants", "data_dir")


def define_flags():
    flags.DEFINE_integer("num_images", 64, "Generated JPEGs.")
    flags.DEFINE_list("image_size", ["1024", "768"], "Generated JPEG WIDTH,HEIGHT (KonIQ's).")
    flags.DEFINE_list("resize", ["512", "384"], "Resize((H, W)) as H,W.")
    flags.DEFINE_integer("crop", 224, "Crop size.")
    flags.DEFINE_integer("crops", 20, "Crops per image per epoch.")
    flags.DEFINE_integer("batch_size", 32, "Crops per batch.")
    flags.DEFINE_float("min_seconds", 10.0, "Time each variant at least this long.")
    flags.DEFINE_integer("min_batches", 10, "... and over at least this many batches.")
    flags.DEFINE_integer("warmup", 3, "Untimed batches first.")
    flags.DEFINE_integer("workers", 2, "Decoding threads / worker processes / torch workers.")
    flags.DEFINE_integer("mix_images", 16, "Images whose crops are shuffled together.")
    flags.DEFINE_list("variants", list(VARIANTS), f"Which to time, of {', '.join(VARIANTS)}.")
    flags.DEFINE_string("data_dir", "", "Where to write the JPEGs and the array_record build "
                        "(default: a temporary folder).")
    flags.DEFINE_string("json", "", "Also write the results to this JSON file.")


def make_jpegs(folder: str, num: int, width: int, height: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs (smooth colour fields plus fine texture, quality 90), the same for
    the same arguments, and a manifest.csv listing them; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        path = os.path.join(folder, f"{i:05d}.jpg")
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        noise = rng.normal(0, 12, (height, width, 1)).astype(np.float32)
        paths.append(path)
        if not os.path.isfile(path):
            img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                             np.float32) + noise
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    with open(os.path.join(folder, "manifest.csv"), "w") as f:
        f.write("path,score,split\n")
        f.writelines(f"{os.path.basename(p)},{i},train\n" for i, p in enumerate(paths))
    return paths


def timed(batches, settings, process=lambda batch: batch):
    """Consumes `batches` (warm-up, then >= min_seconds and >= min_batches); crops/s etc."""
    for _ in range(settings["warmup"]):
        process(next(batches))
    n, t0 = 0, time.perf_counter()
    while n < settings["min_batches"] or time.perf_counter() - t0 < settings["min_seconds"]:
        last = process(next(batches))
        n += 1
    if hasattr(last, "block_until_ready"):
        last.block_until_ready()
    seconds = time.perf_counter() - t0
    crops = n * settings["batch_size"]
    return {"batches": n, "crops": crops, "seconds": seconds, "crops_per_s": crops / seconds,
            "images_per_s": crops / seconds / settings["crops"]}


def bench_grain(variant, settings):
    """A variant of the training pipeline (all but `reference`)."""
    from hyperiqa_jax import config_defaults, data

    config = config_defaults.reference_config().data
    config.update(name="manifest", root=settings["folder"], resize=tuple(settings["resize"]),
                  crop_size=settings["crop"], train_crops=settings["crops"],
                  max_bad_fraction=0.0, num_workers=settings["workers"], worker_processes=0,
                  mix_images=settings["mix_images"])
    if variant == "processes":
        config.update(num_workers=1, worker_processes=settings["workers"])
        data.pipeline.mark_flags_parsed()
    if variant == "array_record":
        builder = data.build_tfds("manifest", settings["folder"], settings["tfds_dir"],
                                  splits=("train",), resize=config.resize,
                                  crop_size=config.crop_size)
        source = data.load_tfds_source(builder, "train")
    else:
        source = data.load_records("manifest", settings["folder"], "train")
    stream = iter(data.make_train_dataset(source, config, batch_size=settings["batch_size"],
                                          seed=0))
    if variant == "float32":
        result = timed(stream, settings, process=lambda b: data.normalize(b["image"]))
    elif variant == "loop":
        result = timed_loop(stream, settings)
    else:
        result = timed(stream, settings)
    return with_bytes(result, settings, 4 if variant == "float32" else 1, settings["workers"])


def with_bytes(result, settings, bytes_per_value, workers):
    crop = settings["crop"]
    result["mb_per_s_to_device"] = result["crops_per_s"] * crop * crop * 3 * bytes_per_value / 1e6
    result["crops_per_s_per_worker"] = result["crops_per_s"] / max(workers, 1)
    return result


def timed_loop(stream, settings):
    """The training loop's consumption: DeviceBatches ahead of a jitted step per batch."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from hyperiqa_jax.data import device

    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    batches = device.DeviceBatches(stream, NamedSharding(mesh, P("data")))
    # A step that depends on the batch (so its transfer must finish) but computes almost
    # nothing: the loop's own cost is measured, not a model's (on the CPU the "device"
    # shares the decoding threads' cores).
    step = jax.jit(lambda total, b: total + b["image"][-1, -1, -1, -1].astype(jnp.int32))
    total = [jnp.zeros((), jnp.int32)]

    def consume(batch):
        total[0] = step(total[0], batch)
        return total[0]

    return timed(batches, settings, process=consume)


def bench_reference(paths, settings):
    """The PyTorch original's loader: one sample per crop, each decoding its JPEG."""
    import torch
    import torchvision.transforms as T

    transform = T.Compose([T.RandomHorizontalFlip(), T.Resize(tuple(settings["resize"])),
                           T.RandomCrop(size=settings["crop"]), T.ToTensor(),
                           T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))])

    def load(batch):  # in the loader's worker processes, as a Dataset's __getitem__ would
        return torch.stack([transform(Image.open(path).convert("RGB")) for path in batch])

    torch.manual_seed(0)
    workers = settings["workers"]
    loader = torch.utils.data.DataLoader(
        [p for p in paths for _ in range(settings["crops"])], batch_size=settings["batch_size"],
        shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0,
        collate_fn=load)

    def forever():
        while True:
            yield from loader

    return with_bytes(timed(forever(), settings), settings, 4, workers)


def run(settings) -> dict:
    unknown = set(settings["variants"]) - set(VARIANTS)
    if unknown:
        raise ConfigError(f"unknown --variants {sorted(unknown)}; choose from {VARIANTS}")
    with tempfile.TemporaryDirectory() as tmp:
        base = settings["data_dir"] or tmp
        settings = dict(settings, folder=os.path.join(base, "jpegs"),
                        tfds_dir=os.path.join(base, "tfds"))
        t0 = time.perf_counter()
        paths = make_jpegs(settings["folder"], settings["num_images"], *settings["image_size"])
        print(f"{len(paths)} JPEGs {settings['image_size'][0]}x{settings['image_size'][1]} in "
              f"{time.perf_counter() - t0:.1f}s; Resize{tuple(settings['resize'])}, crop "
              f"{settings['crop']}, {settings['crops']} crops/image, batch "
              f"{settings['batch_size']}, {settings['workers']} workers, {os.cpu_count()} CPUs",
              flush=True)
        results = {}
        for variant in settings["variants"]:
            results[variant] = (bench_reference(paths, settings) if variant == "reference"
                                else bench_grain(variant, settings))
            print(f"  {variant}: {results[variant]['crops_per_s']:.1f} crops/s", flush=True)
    for r in results.values():
        if "threads" in results:
            r["vs_threads"] = r["crops_per_s"] / results["threads"]["crops_per_s"]
    return {"environment": throughput.environment(),
            "settings": {k: v for k, v in settings.items() if k not in ("folder", "tfds_dir")},
            "results": results}


def print_table(report):
    print(f"{'variant':<14}{'crops/s':>10}{'/worker':>10}{'images/s':>10}{'MB/s':>9}"
          f"{'vs threads':>12}")
    for name, r in report["results"].items():
        ratio = f"{r['vs_threads']:.2f}" if "vs_threads" in r else ""
        print(f"{name:<14}{r['crops_per_s']:>10.1f}{r['crops_per_s_per_worker']:>10.1f}"
              f"{r['images_per_s']:>10.2f}{r['mb_per_s_to_device']:>9.1f}{ratio:>12}")


def main(argv):
    if len(argv) > 1:
        raise ConfigError(f"unexpected arguments {argv[1:]}")
    f = flags.FLAGS
    settings = {name: f[name].value for name in SETTINGS}
    try:
        settings["image_size"] = [int(x) for x in f.image_size]
        settings["resize"] = [int(x) for x in f.resize]
    except ValueError as e:
        raise ConfigError(f"--image_size / --resize take two integers: {e}") from None
    report = run(settings)
    report["command"] = throughput.command_line("benchmarks.input_pipeline", f)
    print_table(report)
    if f.json:
        with open(f.json, "w") as out:
            json.dump(report, out, indent=2)


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)

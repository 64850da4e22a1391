"""Training input pipeline throughput: this package's grain pipeline vs the PyTorch reference.

    python -m benchmarks.input_pipeline                  # defaults: about a minute on 2 cores
    python -m benchmarks.input_pipeline --num-images 200 --batches 120 --workers 2

Both loaders read the same generated 1024x768 JPEGs (KonIQ-10k's size) and
produce the same thing: batches of ImageNet-normalised 224x224 crops after a
horizontal flip and Resize((512, 384)), 20 crops per image per epoch.

- reference: the original HyperIQA/SMART-IQA PyTorch way: the sample list holds
  every image 20 times; each sample opens and decodes the JPEG (PIL), then
  RandomHorizontalFlip, Resize((512, 384)), RandomCrop(224), ToTensor, Normalize;
  torch DataLoader(shuffle=True, num_workers=W).
- ours: hyperiqa_jax.data.make_train_dataset (decode + resize once per image per
  epoch, crops shuffled across images; W decoding threads).

Reported: crops/s (training rows per second) and images/s (crops/s / crops per
image) after a warm-up, and the ratio ours / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np
from PIL import Image


def make_jpegs(folder: str, num: int, width: int, height: int, seed: int = 0) -> list[str]:
    """Photo-like JPEGs: smooth colour fields plus fine texture, quality 90."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(num):
        path = os.path.join(folder, f"{i:05d}.jpg")
        paths.append(path)
        if os.path.isfile(path):
            continue
        coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC),
                         np.float32)
        img += rng.normal(0, 12, (height, width, 1)).astype(np.float32)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)
    return paths


def bench_ours(paths, args) -> dict:
    import ml_collections

    from hyperiqa_jax.data import Record, make_train_dataset

    cfg = ml_collections.ConfigDict(dict(
        resize=tuple(args.resize), crop_size=args.crop, train_crops=args.crops,
        max_bad_fraction=0.0, num_workers=args.workers, mix_images=args.mix_images))
    records = [Record(p, float(i), os.path.basename(p)) for i, p in enumerate(paths)]
    it = iter(make_train_dataset(records, cfg, batch_size=args.batch_size, seed=0))
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    dt = time.perf_counter() - t0
    assert batch["image"].shape == (args.batch_size, args.crop, args.crop, 3)
    crops = args.batches * args.batch_size
    return {"crops_per_s": crops / dt, "images_per_s": crops / dt / args.crops, "seconds": dt}


class _ReferenceDataset:
    """The original code's folder dataset: every image listed `crops` times."""

    def __init__(self, paths, crops, resize, crop):
        import torchvision.transforms as T

        self.samples = [p for p in paths for _ in range(crops)]
        self.transform = T.Compose([
            T.RandomHorizontalFlip(),
            T.Resize(tuple(resize)),
            T.RandomCrop(size=crop),
            T.ToTensor(),
            T.Normalize(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
        ])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path = self.samples[index]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return self.transform(img), float(index)


def bench_reference(paths, args) -> dict:
    import torch

    torch.manual_seed(0)
    ds = _ReferenceDataset(paths, args.crops, args.resize, args.crop)
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True,
                                         num_workers=args.workers, drop_last=True,
                                         persistent_workers=args.workers > 0)
    it = iter(loader)
    needed = args.warmup + args.batches
    if needed > len(loader):
        raise SystemExit(f"--batches + --warmup = {needed} > {len(loader)} batches per epoch "
                         "of the reference loader; use more --num-images")
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
        images, _ = next(it)
    dt = time.perf_counter() - t0
    assert tuple(images.shape) == (args.batch_size, 3, args.crop, args.crop)
    del it, loader
    crops = args.batches * args.batch_size
    return {"crops_per_s": crops / dt, "images_per_s": crops / dt / args.crops, "seconds": dt}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=64, help="generated JPEGs (default 64)")
    p.add_argument("--image-size", type=int, nargs=2, default=(1024, 768),
                   metavar=("WIDTH", "HEIGHT"), help="generated JPEG size (default 1024 768)")
    p.add_argument("--resize", type=int, nargs=2, default=(512, 384), metavar=("H", "W"),
                   help="Resize((H, W)) (default 512 384)")
    p.add_argument("--crop", type=int, default=224, help="crop size (default 224)")
    p.add_argument("--crops", type=int, default=20, help="crops per image per epoch (20)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (32)")
    p.add_argument("--batches", type=int, default=30, help="timed batches per loader (30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed batches first (3)")
    p.add_argument("--workers", type=int, default=2,
                   help="workers: torch DataLoader processes / our decoding threads (2)")
    p.add_argument("--mix-images", type=int, default=16,
                   help="ours: images whose crops are shuffled together (16)")
    p.add_argument("--data-dir", default="",
                   help="where to write the JPEGs (default: a temporary folder)")
    p.add_argument("--skip-reference", action="store_true", help="only time our pipeline")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.data_dir or os.path.join(tmp, "jpegs")
        t0 = time.perf_counter()
        paths = make_jpegs(folder, args.num_images, *args.image_size)
        print(f"{len(paths)} JPEGs {args.image_size[0]}x{args.image_size[1]} ready in "
              f"{time.perf_counter() - t0:.1f}s; Resize{tuple(args.resize)}, crop {args.crop}, "
              f"{args.crops} crops/image, batch {args.batch_size}, {args.workers} workers, "
              f"{os.cpu_count()} CPUs")
        result = {"machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                  "settings": vars(args), "ours": bench_ours(paths, args)}
        if not args.skip_reference:
            result["reference"] = bench_reference(paths, args)
    print(f"{'loader':<28}{'crops/s':>10}{'images/s':>10}")
    rows = [("ours (grain, decode once)", result["ours"])]
    if "reference" in result:
        rows.append(("reference (torch, per crop)", result["reference"]))
    for name, r in rows:
        print(f"{name:<28}{r['crops_per_s']:>10.1f}{r['images_per_s']:>10.2f}")
    if "reference" in result:
        result["ratio"] = result["ours"]["crops_per_s"] / result["reference"]["crops_per_s"]
        print(f"ratio ours / reference (crops/s): {result['ratio']:.1f}x (goal >= 5x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=list)
    return result


if __name__ == "__main__":
    main()

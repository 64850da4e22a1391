r"""Scores image files with a trained checkpoint; writes CSV `path,score,error`.

    python -m hyperiqa_jax.predict --checkpoint runs/demo [--output scores.csv] \
        [--report report.html] [--map maps/] photo.jpg folder/ 'shots/*.png'
    launch/local_cluster.sh -n 2 -d 1 -- python -m hyperiqa_jax.predict \
        --checkpoint runs/demo --output scores.csv photos/      # several processes

Scores are on the training labels' scale, higher = better quality (KonIQ-10k
MOS: 0-100; the demo model's SSIM x 100: 0-100). Each image's score is the mean
over crops on a fixed grid (deterministic; --protocol/--num_crops change it),
after the resize the model was trained with, so any image size works.

Paths may be files, folders (searched recursively for image files) or glob
patterns. A file that cannot be read gets an empty score and its error in the
CSV; the run goes on. `--report report.html` also writes a self-contained HTML
page: a thumbnail, score and path of every scored image, best first, and the
files that failed with their error (hyperiqa_jax/report.py).

Large collections (`--output`): the rows are appended to part files in
OUTPUT.parts/ as each batch is scored, then merged into OUTPUT in the input
order. Rerunning the same command skips every file already scored there (a
killed run loses at most the batch in flight; files that failed are tried
again); the merged CSV is the same as an uninterrupted run's. Delete
OUTPUT.parts/ to score everything again. Started on several processes (the
same start-up as training: launch/local_cluster.sh, SLURM, a TPU pod; see
hyperiqa_jax/distributed.py), each process decodes and scores its share of
the files on its own devices and writes its own part file; process 0 merges.
OUTPUT must then be on storage every process sees.

Quality maps (`--map DIR`): crops every --map_stride pixels over each image are
scored too; DIR gets, per image, NAME.map.png (a heat map over the dimmed
image: red where quality is lowest, blue where highest) and NAME.map.json (the
crops' corners and scores), NAME being the image's path below the inputs'
common folder. The report then shows each map beside its thumbnail.

Exit status: 0 when every file was scored, 1 if any file failed (process 0),
2 for a usage error (no checkpoint there, no image files found, an output
folder missing, OUTPUT.parts/ written by a run with other settings).
"""

import csv
import glob
import io
import json
import os
import sys
import time

from absl import app, flags

from hyperiqa_jax.data.image import PROTOCOLS
from hyperiqa_jax.errors import ConfigError, UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm",
                    ".pgm")
HEADER = ["path", "score", "error"]
PARTS_SUFFIX = ".parts"
RUN_FILE = "run.json"  # the settings the part files were scored with
# Start-up barriers wait for peers that are loading; the last one for peers that are
# still scoring their share (a dead peer ends the wait through jax.distributed).
STARTUP_TIMEOUT_S = 600
FINISH_TIMEOUT_S = 7 * 24 * 3600


def define_flags():
    """Command-line flags (defined only when run as a program)."""
    from hyperiqa_jax import distributed

    flags.DEFINE_string(
        "checkpoint", None, "Training workdir (uses its best checkpoint), best/ or a step folder.")
    flags.DEFINE_string("output", None, "CSV file to write (default: standard output). Also "
                        "makes the run resumable and is required on several processes.")
    flags.DEFINE_integer("batch_size", 64, "Crops per forward call, split over all local "
                         "devices (not per device); crops of several images are mixed, the last "
                         "call is padded. Rounded up to a multiple of the local device count.")
    flags.DEFINE_enum("protocol", "grid", list(PROTOCOLS),
                      "Crop placement: fixed grid (default), one centre crop, or "
                      "seeded random crops.")
    flags.DEFINE_integer("num_crops", None, "Crops per image (default: the run's "
                         "data.test_crops).")
    flags.DEFINE_string("report", None, "Also write a self-contained HTML page of the scored "
                        "images (thumbnails, best first) and the failed files to this file.")
    flags.DEFINE_string("map", None, "Also write a quality map of every image into this folder "
                        "(created): NAME.map.png and NAME.map.json.")
    flags.DEFINE_integer("map_stride", None, "Pixels between the map's crops, in the resized "
                         "image (default: half the crop size).")
    distributed.define_flags()


def expand_paths(patterns):
    """Files, folders (recursive, image extensions) and globs -> list of paths, in order.

    A pattern that matches nothing is kept as is, so it is reported as an error.
    """
    out = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = []
            for root, dirs, files in os.walk(pattern):
                dirs.sort()
                found += [os.path.join(root, f) for f in sorted(files)
                          if f.lower().endswith(IMAGE_EXTENSIONS)]
            out += found
        elif os.path.exists(pattern):
            out.append(pattern)
        elif glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            out += matches or [pattern]
        else:
            out.append(pattern)
    return out


# ---------------------------------------------------------------------------- scoring


def score_rows(model, paths, *, map_dir=None, map_stride=None, map_root=None):
    """Yields a CSV row [path, score, error] per path, in order; with `map_dir`, writes
    each image's quality map there first."""
    rows = model.iter_scores(paths)
    if map_dir is None:
        for i, score, error in rows:
            yield _row(paths[i], score, error)
        return
    from hyperiqa_jax import report

    for (i, score, error), (_, qmap, _) in zip(rows, model.quality_maps(paths, map_stride)):
        if error is None:
            base = map_path(map_dir, paths[i], map_root)
            os.makedirs(os.path.dirname(base), exist_ok=True)
            _write_atomic(base + ".map.png", report.map_png(qmap))
            _write_atomic(base + ".map.json", json.dumps(
                {"path": paths[i], "score": score, **qmap.to_json()}).encode("utf-8"))
        yield _row(paths[i], score, error)


def _row(path, score, error):
    return [path, "", error] if error is not None else [path, f"{score:.4f}", ""]


def common_folder(paths):
    """The deepest folder holding every path (absolute)."""
    return os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])


def map_path(map_dir, path, root):
    """MAP_DIR/<path below root>: where an image's map files go (without the suffix)."""
    return os.path.join(map_dir, os.path.relpath(os.path.abspath(path), root))


def predict_files(model, paths, writer, progress=True, results=None, **map_args):
    """Scores `paths` with a QualityModel, writing rows; returns the number of failures.

    results: a list that collects (path, score, error) per file, if given.
    """
    failed = 0
    for row in _progress(score_rows(model, paths, **map_args), len(paths), progress):
        writer.writerow(row)
        failed += bool(row[2])
        if results is not None:
            results.append(_result(row))
    return failed


def _progress(rows, total, enabled, desc="scoring"):
    from tqdm import tqdm

    # tqdm shows images/s and the time left; a log file gets a line every 10 s.
    return tqdm(rows, total=total, desc=desc, unit="img", disable=not enabled,
                file=sys.stderr, mininterval=0.1 if sys.stderr.isatty() else 10.0)


def _result(row):
    """(path, score, error) of a CSV row."""
    return row[0], float(row[1]) if row[1] else float("nan"), row[2] or None


# ---------------------------------------------------------------------------- part files


class PartFiles:
    """OUTPUT.parts/: the settings of the run (run.json) and every process's scored rows.

    Rows are keyed by path: a rerun skips the paths that have a score (in any part
    file, whatever the process count that wrote it) and tries failed ones again.
    """

    def __init__(self, output, settings):
        self.output = output
        self.folder = output + PARTS_SUFFIX
        self.settings = settings

    def prepare(self):
        """Process 0: creates the folder and run.json, or checks that they match."""
        os.makedirs(self.folder, exist_ok=True)
        if not self.check(missing_ok=True):
            _write_atomic(os.path.join(self.folder, RUN_FILE),
                          json.dumps(self.settings, indent=2).encode("utf-8"))

    def check(self, missing_ok=False):
        """Whether run.json is there; raises UserError if it holds other settings."""
        path = os.path.join(self.folder, RUN_FILE)
        if not os.path.isfile(path):
            if missing_ok:
                return False
            raise UserError(f"{path} is not visible from process {_process_index()}: with "
                            "several processes, --output must be on storage every process "
                            "sees (a shared file system)")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved != self.settings:
            changed = sorted(k for k in {*saved, *self.settings}
                             if saved.get(k) != self.settings.get(k))
            raise UserError(
                f"{self.folder} holds rows scored with other settings ({', '.join(changed)}: "
                f"{ {k: saved.get(k) for k in changed} } then, "
                f"{ {k: self.settings.get(k) for k in changed} } now); rerun with those "
                "settings to resume, or delete the folder (or choose another --output) to "
                "start again")
        return True

    def part_files(self):
        return sorted(os.path.join(self.folder, f) for f in os.listdir(self.folder)
                      if f.startswith("part-") and f.endswith(".csv"))

    def read(self):
        """{path: row}: the scored row of every path that has one, else its last error row."""
        rows = {}
        for part in self.part_files():
            for row in read_complete_rows(part):
                if len(row) == 3 and (row[1] or not rows.get(row[0], ["", ""])[1]):
                    rows[row[0]] = row
        return rows

    def writer(self, process_index, process_count):
        """This process's part file, open for appending (a torn last line cut off)."""
        path = os.path.join(self.folder,
                            f"part-{process_index:05d}-of-{process_count:05d}.csv")
        _cut_torn_line(path)
        return PartWriter(path)


class PartWriter:
    """Appends rows to a part file; `flush` writes the buffered ones in one call."""

    def __init__(self, path):
        self.file = open(path, "a", newline="", encoding="utf-8")
        self.buffer = io.StringIO()
        self.csv = csv.writer(self.buffer)
        self.pending = 0

    def writerow(self, row):
        self.csv.writerow(row)
        self.pending += 1

    def flush(self):
        if self.pending:
            self.file.write(self.buffer.getvalue())
            self.file.flush()
            self.buffer.seek(0)
            self.buffer.truncate()
            self.pending = 0

    def close(self):
        self.flush()
        self.file.close()


def read_complete_rows(path):
    """The CSV rows of a part file, without a last line that a killed writer tore."""
    with open(path, newline="", encoding="utf-8") as f:
        text = f.read()
    return list(csv.reader(io.StringIO(text[:text.rfind("\n") + 1])))


def _cut_torn_line(path):
    if not os.path.exists(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def merge(paths, rows, output):
    """Writes OUTPUT: the header and one row per input path, in the input order."""
    missing = [p for p in paths if p not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} files have no row in the part files, e.g. "
                           f"{missing[0]}")
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(HEADER)
    writer.writerows(rows[p] for p in paths)
    _write_atomic(output, buf.getvalue().encode("utf-8"))


def score_share(model, share, part, *, progress, map_args):
    """Scores this process's share into its part file, flushing per batch of images."""
    per_flush = max(1, model.batch_size // model.num_crops)
    for row in _progress(score_rows(model, share, **map_args), len(share), progress,
                         desc=_desc()):
        part.writerow(row)
        if part.pending >= per_flush:
            part.flush()
    part.close()


def score_resumable(model, paths, parts, *, progress, map_args):
    """This process's share of the files not scored yet, into its part file; process 0 then
    merges every part file into OUTPUT. Returns (results on process 0 else None, the number
    of files an earlier run had scored)."""
    import jax

    rank, processes = jax.process_index(), jax.process_count()
    parts.check()
    done = parts.read()
    barrier("read", STARTUP_TIMEOUT_S)  # nobody appends before everyone has read
    todo = [p for p in dict.fromkeys(paths) if not (p in done and done[p][1])]
    before = len(set(paths)) - len(todo)
    if before and rank == 0:
        print(f"resuming: {before} of {len(set(paths))} files already scored in "
              f"{parts.folder}", file=sys.stderr)
    share = todo[rank::processes]  # every process computes the same todo list
    score_share(model, share, parts.writer(rank, processes), progress=progress,
                map_args=map_args)
    if processes > 1:
        print(f"process {rank}: scored its {len(share)} files", file=sys.stderr)
    barrier("scored", FINISH_TIMEOUT_S)
    results = None
    if rank == 0:
        rows = parts.read()
        merge(paths, rows, parts.output)
        results = [_result(rows[p]) for p in paths]
    barrier("merged", STARTUP_TIMEOUT_S)
    return results, before


# ---------------------------------------------------------------------------- processes


def _process_index():
    import jax

    return jax.process_index()


def _desc():
    import jax

    if jax.process_count() == 1:
        return "scoring"
    return f"scoring (process {jax.process_index()}/{jax.process_count()})"


def barrier(name, timeout_s):
    """Waits until every process of the job reaches `name` (no-op in one process)."""
    import jax

    if jax.process_count() > 1:
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=f"hyperiqa_jax_predict_{name}",
                                        timeout_ms=int(timeout_s * 1000))


def _write_atomic(path, data: bytes):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_output_file(flag, path):
    """An output file must be creatable: its folder exists and it is not a folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        example = os.path.join(path, "scores.csv" if flag == "output" else "report.html")
        raise ConfigError(f"--{flag} {path} is a folder; give a file name, e.g. {example}")
    if not os.path.isdir(folder):
        raise ConfigError(f"--{flag} {path}: the folder {folder} does not exist; create it first")


def _check_flags(FLAGS):
    for name in ("batch_size", "num_crops", "map_stride"):
        if FLAGS[name].value is not None and FLAGS[name].value < 1:
            raise ConfigError(f"--{name}={FLAGS[name].value} must be at least 1")
    for name in ("output", "report"):
        if FLAGS[name].value:
            _check_output_file(name, FLAGS[name].value)
    if FLAGS.map:
        if os.path.isfile(FLAGS.map):
            raise ConfigError(f"--map {FLAGS.map} is a file; give a folder for the maps")
        parent = os.path.dirname(os.path.abspath(FLAGS.map))
        if not os.path.isdir(parent):
            raise ConfigError(f"--map {FLAGS.map}: the folder {parent} does not exist; "
                              "create it first")


def main(argv):
    FLAGS = flags.FLAGS
    patterns = argv[1:]
    if not FLAGS.checkpoint:
        raise app.UsageError("--checkpoint is required")
    if not patterns:
        raise app.UsageError("give at least one image file, folder or glob")
    _check_flags(FLAGS)
    paths = expand_paths(patterns)
    if not paths:
        raise UserError(f"no image files in {' '.join(patterns)} (folders are searched for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    from hyperiqa_jax import checkpointing, distributed

    manager_dir, step = checkpointing.resolve_checkpoint(FLAGS.checkpoint)
    distributed.initialize()  # before anything touches a device; one process: nothing
    import jax

    rank, processes = jax.process_index(), jax.process_count()
    if processes > 1 and not FLAGS.output:
        raise UserError(f"predict runs on {processes} processes: give --output (on storage "
                        "every process sees); each process writes its share there")
    settings = {"checkpoint": f"{manager_dir}/{step}", "protocol": FLAGS.protocol,
                "num_crops": FLAGS.num_crops, "batch_size": FLAGS.batch_size,
                "map": FLAGS.map and os.path.abspath(FLAGS.map),
                "map_stride": FLAGS.map_stride}
    parts = PartFiles(FLAGS.output, settings) if FLAGS.output else None
    if parts is not None:  # every process refuses a mismatch, none waits for the others
        parts.prepare() if rank == 0 else parts.check(missing_ok=True)
    barrier("prepared", STARTUP_TIMEOUT_S)

    from hyperiqa_jax.scoring import QualityModel

    start = time.time()
    model = QualityModel.from_checkpoint(FLAGS.checkpoint, batch_size=FLAGS.batch_size,
                                         protocol=FLAGS.protocol, num_crops=FLAGS.num_crops)
    map_args = {}
    if FLAGS.map:
        map_args = dict(map_dir=FLAGS.map, map_stride=FLAGS.map_stride or model.crop_size // 2,
                        map_root=common_folder(paths))
        os.makedirs(FLAGS.map, exist_ok=True)
    progress = sys.stderr.isatty() or bool(FLAGS.output)

    if parts is None:  # one process, CSV to standard output as the rows come
        results = []
        writer = csv.writer(sys.stdout)
        writer.writerow(HEADER)
        failed = predict_files(model, paths, writer, progress=progress, results=results,
                               **map_args)
        before = 0
    else:
        results, before = score_resumable(model, paths, parts, progress=progress,
                                          map_args=map_args)
        if results is None:  # not process 0: its share is in the merged CSV
            return 0
        failed = sum(1 for _, _, e in results if e)
    if FLAGS.report:
        _write_report(FLAGS, results, model.source, patterns, map_args)
    wrote = [f for f in (FLAGS.output, FLAGS.report, FLAGS.map) if f]
    seconds = time.time() - start
    scored_now = len(set(paths)) - before
    print(f"scored {len(paths) - failed} of {len(paths)} images ({failed} failed"
          + (f"; {before} scored by an earlier run" if before else "")
          + f") in {seconds:.1f} s ({scored_now / max(seconds, 1e-9):.2f} images/s"
          + (f" over {processes} processes" if processes > 1 else "")
          + f"); checkpoint {model.source}; higher scores = better quality"
          + (f"; wrote {', '.join(wrote)}" if wrote else ""), file=sys.stderr)
    return 1 if failed else 0


def _write_report(FLAGS, results, source, patterns, map_args):
    from hyperiqa_jax import report

    maps = {}
    for path, _, error in results:
        png = map_args and map_path(map_args["map_dir"], path, map_args["map_root"]) + ".map.png"
        if error is None and png and os.path.isfile(png):
            with open(png, "rb") as f:
                maps[path] = report.png_data_uri(f.read())
    report.write_report(FLAGS.report, results, source=source, maps=maps,
                        title=f"Image quality: {' '.join(patterns)}")


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)

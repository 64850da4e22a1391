"""Readers for the published label files of each data set, and splits.

Every reader returns a list of `Record`s; label-file problems (missing file or
column, empty or non-numeric score, duplicate image name, listed image missing
on disk) raise `LabelFileError` naming the file, the row (1-based, the header
being row 1 for CSV) and the column.

KonIQ-10k, SPAQ, KADID-10k and AGIQA-3K publish one table each (CSV or xlsx:
an image-name column and score columns) and are described by a `TableSpec` in
`TABLES`; LIVE Challenge (.mat files) and manifests have their own readers.
Roots, label files and images may be local paths or URLs such as
``gs://bucket/koniq10k`` (paths.py reads them).

The split syntax of `load_records(..., split=...)` ("all", "train", "official:test",
"random:train", "json:PATH", ...) is described once, for users, in docs/data.md
("Splits"); `select_records` implements it.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import os

import numpy as np

from hyperiqa_jax.data.tables import (
    check_duplicates,
    check_files_exist,
    check_name,
    parse_score,
    read_json,
    read_table,
    require_columns,
)
from hyperiqa_jax.errors import ConfigError, DatasetNotFoundError, LabelFileError
from hyperiqa_jax.paths import exists, is_url, isdir, isfile, join, parent, path_in, read_bytes

DATASETS = ("koniq10k", "spaq", "kadid10k", "agiqa3k", "livec", "manifest", "demo")
PARTS = ("train", "val", "test")
# The one mapping of split names: KonIQ's sets file and manifests' split column
# say training / validation, users may too.
PART_ALIASES = {"training": "train", "validation": "val", "valid": "val"}


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled image: absolute `path`, `score`, `image_id` (name), `ref` (reference)."""

    path: str
    score: float
    image_id: str
    ref: str | None = None


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """Where a data set published as one label table keeps its labels and images."""

    label_files: tuple[str, ...]  # under root, '/'-separated; the first that exists is read
    name_column: str              # image file name, relative to the image folder
    score_column: str             # the default data.label
    image_dirs: tuple[str, ...]   # candidates under root ('' = root): the first holding row 1
    ref_column: str | None = None  # reference image: random splits keep references apart
    split_file: str | None = None  # official split: CSV of name_column and 'set'


TABLES = {
    "koniq10k": TableSpec(("koniq10k_scores_and_distributions.csv",), "image_name",
                          "MOS_zscore", ("1024x768", "512x384", "images", ""),
                          split_file="koniq10k_distributions_sets.csv"),
    "spaq": TableSpec(("Annotations/MOS and Image attribute scores.xlsx",
                       "MOS and Image attribute scores.xlsx",
                       "Annotations/MOS and Image attribute scores.csv", "mos.csv"),
                      "Image name", "MOS", ("TestImage", "images", "")),
    "kadid10k": TableSpec(("dmos.csv",), "dist_img", "dmos", ("images", ""),
                          ref_column="ref_img"),
    "agiqa3k": TableSpec(("data.csv",), "name", "mos_quality",
                         ("images", "AGIQA-3K", "AGIQA-3k", "image", "")),
}

DOWNLOAD_HELP = {
    "koniq10k": (
        "KonIQ-10k (https://database.mmsp-kn.de/koniq-10k-database.html): put "
        "koniq10k_scores_and_distributions.csv and the folder 1024x768/ (from "
        "koniq10k_1024x768.zip) under ROOT; for the official split also "
        "koniq10k_distributions_sets.csv."),
    "spaq": (
        "SPAQ (https://github.com/h4nwei/SPAQ): put 'Annotations/MOS and Image attribute "
        "scores.xlsx' (or a CSV with columns 'Image name' and 'MOS') and the folder "
        "TestImage/ under ROOT."),
    "kadid10k": (
        "KADID-10k (https://database.mmsp-kn.de/kadid-10k-database.html): unzip kadid10k.zip "
        "so that ROOT holds dmos.csv and images/."),
    "agiqa3k": (
        "AGIQA-3K (https://github.com/lcysyzxdxc/AGIQA-3k-Database): put data.csv and the "
        "image folder (images/ or AGIQA-3K/, or the images next to data.csv) under ROOT."),
    "livec": (
        "LIVE In the Wild Challenge (https://live.ece.utexas.edu/research/ChallengeDB/): unzip "
        "ChallengeDB_release.zip so that ROOT holds Data/AllMOS_release.mat, "
        "Data/AllImages_release.mat and Images/."),
    "manifest": (
        "a manifest: a CSV or JSON file (or a folder holding manifest.csv / manifest.json) "
        "with one row per image: a path column (relative to the manifest's folder) and a "
        "score column."),
    "demo": "the demo data set: call hyperiqa_jax.data.ensure_demo_dataset() to generate it.",
}


# --------------------------------------------------------------------------- helpers


def _missing(name: str, root: str, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {what} not found under root {root!r}. Expected layout: "
        + DOWNLOAD_HELP[name].replace("ROOT", repr(root)))


def _part(value) -> str:
    text = str(value or "").strip().lower()
    return PART_ALIASES.get(text, text)


def _split_column(path: str, rows: list[dict], name_col: str, split_col: str,
                  first_row: int) -> dict[str, str]:
    """{image name: 'train' / 'val' / 'test'} from a split column."""
    parts = {}
    for i, row in enumerate(rows):
        n = i + first_row
        part = _part(row.get(split_col))
        if part not in PARTS:
            raise LabelFileError(
                f"{path}, row {n}, column {split_col!r}: {row.get(split_col)!r} is not train / "
                "val / test (or training / validation)")
        parts[check_name(row.get(name_col), path, n, name_col)] = part
    return parts


def _table_records(path: str, rows: list[dict], name_col: str, score_col: str, image_dir: str,
                   ref_col: str | None = None, first_row: int = 2) -> list[Record]:
    records, row_numbers = [], []
    for i, row in enumerate(rows):
        rown = i + first_row
        name = check_name(row.get(name_col), path, rown, name_col)
        score = parse_score(row.get(score_col), path, rown, score_col)
        ref = check_name(row.get(ref_col), path, rown, ref_col) if ref_col else None
        records.append(Record(path_in(image_dir, name), score, name, ref))
        row_numbers.append(rown)
    check_duplicates([(r.image_id, n) for r, n in zip(records, row_numbers)], path, name_col)
    check_files_exist([r.path for r in records], row_numbers, path, name_col)
    return records


# --------------------------------------------------------------------------- readers
# Each returns (records, official split {image name: part} or None, the split's file).


def _read_table(name: str, root: str, label: str | None):
    spec = TABLES[name]
    path = next((p for p in (join(root, *f.split("/")) for f in spec.label_files)
                 if isfile(p)), None)
    if path is None:
        first = spec.label_files[0]
        raise _missing(name, root, repr(first) if " " in first else first)
    header, rows = read_table(path)
    score_col = label or spec.score_column
    require_columns(path, header, [spec.name_column, score_col]
                    + ([spec.ref_column] if spec.ref_column else []))
    if not rows:
        raise LabelFileError(f"{path}: no data rows")
    sample = rows[0].get(spec.name_column) or ""
    image_dir = next((d for d in (join(root, sub) if sub else root for sub in spec.image_dirs)
                      if sample and isfile(join(d, sample))), None)
    if image_dir is None:
        raise _missing(name, root, f"image folder {spec.image_dirs[0]}/ (with {sample!r})")
    records = _table_records(path, rows, spec.name_column, score_col, image_dir,
                             spec.ref_column)
    official, sets_path = None, None
    if spec.split_file:
        sets_path = join(root, spec.split_file)
        if isfile(sets_path):
            sets_header, sets_rows = read_table(sets_path)
            require_columns(sets_path, sets_header, [spec.name_column, "set"])
            official = _split_column(sets_path, sets_rows, spec.name_column, "set", 2)
    return records, official, sets_path


def _read_livec(root: str, label: str | None):
    from scipy import io as sio

    mos_path = join(root, "Data", "AllMOS_release.mat")
    names_path = join(root, "Data", "AllImages_release.mat")
    for rel, p in (("Data/AllMOS_release.mat", mos_path),
                   ("Data/AllImages_release.mat", names_path)):
        if not isfile(p):
            raise _missing("livec", root, rel)

    def _load(p, key):
        try:
            m = sio.loadmat(io.BytesIO(read_bytes(p)))
        except Exception as e:  # noqa: BLE001 - scipy raises many types for bad files
            raise LabelFileError(f"{p}: not a readable .mat file ({e})") from None
        if key not in m:
            keys = [k for k in m if not k.startswith("__")]
            raise LabelFileError(f"{p}: missing variable {key!r}; it has {keys}")
        return m[key]

    mos_key = label or "AllMOS_release"
    mos = np.asarray(_load(mos_path, mos_key), dtype=object).reshape(-1)
    names_raw = np.asarray(_load(names_path, "AllImages_release"), dtype=object).reshape(-1)
    if len(mos) != len(names_raw):
        raise LabelFileError(
            f"{mos_path}: {len(mos)} scores but {names_path} lists {len(names_raw)} images")
    records, rows = [], []
    # The first 7 entries are the practice images in Images/trainingImages/; like HyperIQA,
    # they are left out (1,162 images remain).
    for i in range(7 if len(mos) > 7 else 0, len(mos)):
        raw = names_raw[i]
        name = str(np.asarray(raw).reshape(-1)[0]) if np.size(raw) else ""
        name = check_name(name, names_path, i + 1, "AllImages_release")
        try:
            score = parse_score(np.asarray(mos[i], dtype=np.float64).reshape(-1)[0],
                                mos_path, i + 1, mos_key)
        except (TypeError, ValueError, IndexError):
            raise LabelFileError(
                f"{mos_path}, entry {i + 1}, variable {mos_key!r}: not a number") from None
        records.append(Record(path_in(join(root, "Images"), name), score, name))
        rows.append(i + 1)
    check_duplicates([(r.image_id, n) for r, n in zip(records, rows)], names_path,
                     "AllImages_release")
    check_files_exist([r.path for r in records], rows, names_path, "AllImages_release")
    return records, None, None


PATH_COLUMNS = ("path", "image", "image_path", "image_name", "img_path", "filename", "file",
                "name", "dist_img")
SCORE_COLUMNS = ("score", "mos", "MOS", "dmos", "mos_quality", "label", "quality")


def _read_manifest(root: str, label: str | None, path_column: str | None = None):
    path = root if isfile(root) else next(
        (p for p in (join(root, n) for n in ("manifest.csv", "manifest.json")) if isfile(p)),
        None)
    if path is None:
        raise _missing("manifest", root, "manifest.csv / manifest.json")
    if path.endswith(".json"):
        data = read_json(path)
        if isinstance(data, dict):
            data = data.get("images", data.get("data"))
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise LabelFileError(f"{path}: expected a JSON list of objects (one per image)")
        header = sorted({k for d in data for k in d})
        rows = [{k: (None if d.get(k) is None else str(d.get(k))) for k in header} for d in data]
        first_row = 1  # JSON: entry number, 1-based.
    else:
        header, rows = read_table(path)
        first_row = 2
    name_col = path_column or next((c for c in PATH_COLUMNS if c in header), None)
    score_col = label or next((c for c in SCORE_COLUMNS if c in header), None)
    if name_col is None or score_col is None:
        raise LabelFileError(
            f"{path}: cannot tell the {'path' if name_col is None else 'score'} column; "
            f"header {header}. Name it ({PATH_COLUMNS if name_col is None else SCORE_COLUMNS}) "
            "or pass it (path_column= / label=).")
    ref_col = "ref" if "ref" in header else None
    require_columns(path, header, [name_col, score_col])
    if not rows:
        raise LabelFileError(f"{path}: no data rows")
    records = _table_records(path, rows, name_col, score_col, parent(path), ref_col, first_row)
    official = (_split_column(path, rows, name_col, "split", first_row)
                if "split" in header else None)
    return records, official, path


# --------------------------------------------------------------------------- splits


def _random_split(records: list[Record], part: str, seed: int, ratio: float) -> list[Record]:
    if part not in ("train", "test"):
        raise ConfigError(f"a random split has only 'train' and 'test' parts, not {part!r}")
    if not 0.0 < ratio < 1.0:
        raise ConfigError(f"split_ratio must be in (0, 1), got {ratio}")
    if any(r.ref is not None for r in records):
        groups = sorted({r.ref for r in records})
        perm = np.random.default_rng(seed).permutation(len(groups))
        n_train = int(round(ratio * len(groups)))
        train_groups = {groups[i] for i in perm[:n_train]}
        keep = [(r.ref in train_groups) == (part == "train") for r in records]
        return [r for r, k in zip(records, keep) if k]
    perm = np.random.default_rng(seed).permutation(len(records))
    n_train = int(round(ratio * len(records)))
    chosen = sorted(perm[:n_train] if part == "train" else perm[n_train:])
    return [records[i] for i in chosen]


def _json_split(records: list[Record], root: str, rel: str) -> list[Record]:
    if is_url(rel) or os.path.isabs(rel):
        path = rel
    else:
        path = join(root if isdir(root) else parent(root), rel)
    if not isfile(path):
        raise LabelFileError(f"split list {path} not found")
    data = read_json(path)
    if isinstance(data, dict):
        data = next((data[k] for k in ("images", "files", "data") if k in data), None)
    if not isinstance(data, list):
        raise LabelFileError(f"{path}: expected a JSON list of image names or objects")
    by_name = {r.image_id: r for r in records}
    by_base = {os.path.basename(r.image_id): r for r in records}
    out, seen = [], set()
    for i, entry in enumerate(data):
        if isinstance(entry, dict):
            key = next((k for k in PATH_COLUMNS + ("img", "image_id") if k in entry), None)
            if key is None:
                raise LabelFileError(f"{path}, entry {i + 1}: no image-name key "
                                     f"({', '.join(PATH_COLUMNS)})")
            name = entry[key]
        else:
            name = entry
        if not isinstance(name, str) or not name:
            raise LabelFileError(f"{path}, entry {i + 1}: {name!r} is not an image name")
        rec = by_name.get(name) or by_base.get(os.path.basename(name))
        if rec is None:
            raise LabelFileError(f"{path}, entry {i + 1}: image {name!r} is not in the labels")
        if rec.image_id in seen:
            raise LabelFileError(f"{path}, entry {i + 1}: duplicate image name {name!r}")
        seen.add(rec.image_id)
        out.append(rec)
    return out


def load_records(name: str, root, split: str, *, label: str | None = None, seed: int = 0,
                 split_ratio: float = 0.8, path_column: str | None = None) -> list[Record]:
    """The labelled images of data set `name` under `root` for `split` (see module doc).

    root: a local folder or a URL (gs://bucket/folder); manifests: also the file.
    label: the score column (KonIQ default MOS_zscore; SPAQ MOS; KADID dmos; AGIQA-3K
    mos_quality; LIVE Challenge the .mat variable AllMOS_release; manifest: score/mos/...).
    path_column: manifest only, the image-path column. Records keep the label
    file's order (json splits: the list's order).
    """
    return select_records(name, root, split, label=label, seed=seed, split_ratio=split_ratio,
                          path_column=path_column)[0]


def select_records(name: str, root, split: str, *, label: str | None = None, seed: int = 0,
                   split_ratio: float = 0.8, path_column: str | None = None
                   ) -> tuple[list[Record], str]:
    """`load_records` and how the split was chosen: 'all', 'official', 'random' or 'json'.

    Only 'random' depends on `seed` and `split_ratio`.
    """
    if name not in DATASETS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown data set {name!r}; {hint}choose one of {', '.join(DATASETS)}")
    root = os.fspath(root) if root else ""
    if name == "demo" and not root:
        from hyperiqa_jax.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset()
    if not root:
        hint = DOWNLOAD_HELP[name].replace("ROOT", "it")
        raise DatasetNotFoundError(f"{name}: no data root given (config.data.root). {hint}")
    if not exists(root):
        raise DatasetNotFoundError(
            f"{name}: data root {root!r} does not exist (config.data.root). Expected layout: "
            + DOWNLOAD_HELP[name].replace("ROOT", "it"))
    if name in TABLES:
        records, official, split_file = _read_table(name, root, label or None)
    elif name == "livec":
        records, official, split_file = _read_livec(root, label or None)
    else:
        records, official, split_file = _read_manifest(root, label or None, path_column)
    split = (split or "").strip()
    out, mode = _select(name, root, split, records, official, split_file, seed, split_ratio)
    if not out:
        raise ConfigError(f"{name}: split {split!r} of {root!r} is empty")
    return out, mode


def _select(name, root, split, records, official, split_file, seed, split_ratio):
    mode, _, part = split.partition(":") if ":" in split else ("", "", split)
    if mode == "json":
        return _json_split(records, root, part), "json"
    part = _part(part)
    if part == "all" and mode in ("", "all"):
        return list(records), "all"
    if part not in PARTS:
        raise ConfigError(f"unknown split {split!r}: use all, train, val, test, official:PART, "
                          "random:train / random:test or json:PATH")
    # A data set with an official split file uses it by default, even when it is absent.
    split_file_name = TABLES[name].split_file if name in TABLES else None
    if mode == "":
        mode = "official" if (official is not None or split_file_name) else "random"
    if mode == "official":
        if official is None:
            if split_file_name:
                raise _missing(name, root, f"{split_file_name} (official split; or use split "
                               "'random:train' / 'random:test')")
            raise ConfigError(f"{name}: no official split in the labels; use 'random:{part}'")
        missing = [r.image_id for r in records if r.image_id not in official]
        if missing:
            raise LabelFileError(f"{split_file}: {len(missing)} labelled image(s) have no set, "
                                 f"e.g. {missing[:3]}")
        return [r for r in records if official[r.image_id] == part], "official"
    if mode == "random":
        return _random_split(records, part, seed, split_ratio), "random"
    raise ConfigError(f"unknown split mode {mode!r} in {split!r}")

"""Readers for the published label files of each data set, and splits.

Every reader returns a list of `Record`s; label-file problems (missing file or
column, empty or non-numeric score, duplicate image name, listed image missing
on disk) raise `LabelFileError` naming the file, the row (1-based, the header
being row 1 for CSV) and the column.

Split syntax (`load_records(..., split=...)`):

- ``"all"``: every image (zero-shot evaluation sets).
- ``"train"`` / ``"test"`` / ``"val"``: the data set's default split. KonIQ-10k:
  the official split from ``koniq10k_distributions_sets.csv``; manifest/demo: the
  ``split`` column; the others: a seeded random ``split_ratio`` split.
- ``"official:train"`` etc.: the official/column split explicitly.
- ``"random:train"`` / ``"random:test"``: seeded ratio split (HyperIQA's 10 x 80/20
  protocol = seeds 0..9). Data sets with reference images (KADID-10k, demo) are
  split by reference so test content is unseen in training.
- ``"json:PATH"``: the images named in a JSON list (``koniq_train.json`` style: a
  list of names, or of objects with an image-name key). PATH is relative to root.
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import json
import math
import os
import re
import xml.etree.ElementTree as ET
import zipfile

import numpy as np

from hyperiqa_jax.cli import ConfigError, UserError

DATASETS = ("koniq10k", "spaq", "kadid10k", "agiqa3k", "livec", "manifest", "demo")


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled image: absolute `path`, `score`, `image_id` (name), `ref` (reference)."""

    path: str
    score: float
    image_id: str
    ref: str | None = None


class LabelFileError(UserError, ValueError):
    """A label or split file is missing or malformed."""


class DatasetNotFoundError(UserError, FileNotFoundError):
    """A data set's published files are not where they should be."""


# --------------------------------------------------------------------------- helpers


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


def _missing(name: str, root: str, what: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name}: {what} not found under root {root!r}. Expected layout: "
        + DOWNLOAD_HELP[name].replace("ROOT", repr(root)))


def _read_csv(path: str) -> tuple[list[str], list[dict[str, str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            rows = []
            for row in reader:
                rows.append({(k or "").strip(): (v.strip() if isinstance(v, str) else v)
                             for k, v in row.items()})
    except UnicodeDecodeError as e:
        raise LabelFileError(f"{path}: not a UTF-8 text CSV file ({e})") from None
    except csv.Error as e:
        raise LabelFileError(f"{path}: malformed CSV ({e})") from None
    if not header:
        raise LabelFileError(f"{path}: empty file, no CSV header")
    return header, rows


def _require_columns(path: str, header: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise LabelFileError(
            f"{path}: missing column(s) {missing}; the header has {header}")


def _parse_score(value, path: str, row: int, column: str) -> float:
    if value is None or (isinstance(value, str) and value.strip() == ""):
        raise LabelFileError(f"{path}, row {row}, column {column!r}: empty score")
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise LabelFileError(
            f"{path}, row {row}, column {column!r}: score {value!r} is not a number") from None
    if not math.isfinite(score):
        raise LabelFileError(f"{path}, row {row}, column {column!r}: score is {score}")
    return score


def _check_name(value, path: str, row: int, column: str) -> str:
    if value is None or str(value).strip() == "":
        raise LabelFileError(f"{path}, row {row}, column {column!r}: empty image name")
    return str(value).strip()


def _check_duplicates(items: list[tuple[str, int]], path: str, column: str) -> None:
    seen: dict[str, int] = {}
    for name, row in items:
        if name in seen:
            raise LabelFileError(
                f"{path}, row {row}, column {column!r}: duplicate image name {name!r} "
                f"(first at row {seen[name]})")
        seen[name] = row


def _check_exist(records: list[Record], rows: list[int], label_path: str, column: str) -> None:
    missing = [(r, row) for r, row in zip(records, rows) if not os.path.isfile(r.path)]
    if missing:
        shown = "; ".join(f"row {row}: {r.path}" for r, row in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise LabelFileError(
            f"{label_path}, column {column!r}: {len(missing)} listed image file(s) missing: "
            f"{shown}{more}")


def _find_image_dir(root: str, candidates: list[str], sample: str) -> str | None:
    for sub in candidates:
        d = os.path.join(root, sub) if sub else root
        if os.path.isfile(os.path.join(d, sample)):
            return d
    return None


# --------------------------------------------------------------------------- xlsx


def read_xlsx(path: str) -> list[list[str]]:
    """Rows of the first sheet of an .xlsx file as strings (no openpyxl needed)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    try:
        with zipfile.ZipFile(path) as z:
            shared: list[str] = []
            if "xl/sharedStrings.xml" in z.namelist():
                root = ET.fromstring(z.read("xl/sharedStrings.xml"))
                for si in root.findall("m:si", ns):
                    shared.append("".join(t.text or "" for t in si.iter(f"{{{ns['m']}}}t")))
            sheets = sorted(n for n in z.namelist() if re.match(r"xl/worksheets/sheet\d+\.xml$", n))
            if not sheets:
                raise LabelFileError(f"{path}: no worksheet in the xlsx file")
            sheet = ET.fromstring(z.read(sheets[0]))
    except (zipfile.BadZipFile, ET.ParseError, KeyError) as e:
        raise LabelFileError(f"{path}: not a readable .xlsx file ({e})") from None
    rows: list[list[str]] = []
    for row in sheet.iter(f"{{{ns['m']}}}row"):
        cells: dict[int, str] = {}
        for c in row.findall("m:c", ns):
            ref = c.get("r", "")
            letters = re.match(r"[A-Z]+", ref)
            col = 0
            if letters:
                for ch in letters.group(0):
                    col = col * 26 + (ord(ch) - 64)
                col -= 1
            else:
                col = len(cells)
            kind = c.get("t")
            v = c.find("m:v", ns)
            if kind == "s" and v is not None:
                text = shared[int(v.text)]
            elif kind == "inlineStr":
                text = "".join(t.text or "" for t in c.iter(f"{{{ns['m']}}}t"))
            else:
                text = v.text if v is not None and v.text is not None else ""
            cells[col] = text
        if cells:
            rows.append([cells.get(i, "") for i in range(max(cells) + 1)])
    return rows


# --------------------------------------------------------------------------- readers
# Each returns (records, rows, label_path, official_split or None, ref-groups flag).


def _table_records(path: str, header: list[str], rows: list[dict], name_col: str,
                   score_col: str, image_dir: str, ref_col: str | None = None,
                   first_row: int = 2) -> tuple[list[Record], list[int]]:
    _require_columns(path, header, [name_col, score_col] + ([ref_col] if ref_col else []))
    records, row_numbers = [], []
    for i, row in enumerate(rows):
        rown = i + first_row
        name = _check_name(row.get(name_col), path, rown, name_col)
        score = _parse_score(row.get(score_col), path, rown, score_col)
        ref = _check_name(row.get(ref_col), path, rown, ref_col) if ref_col else None
        records.append(Record(os.path.abspath(os.path.join(image_dir, name)), score, name, ref))
        row_numbers.append(rown)
    if not records:
        raise LabelFileError(f"{path}: no data rows")
    _check_duplicates([(r.image_id, n) for r, n in zip(records, row_numbers)], path, name_col)
    _check_exist(records, row_numbers, path, name_col)
    return records, row_numbers


def _read_koniq(root: str, label: str | None):
    path = os.path.join(root, "koniq10k_scores_and_distributions.csv")
    if not os.path.isfile(path):
        raise _missing("koniq10k", root, "koniq10k_scores_and_distributions.csv")
    header, rows = _read_csv(path)
    _require_columns(path, header, ["image_name"])
    sample = rows[0].get("image_name", "") if rows else ""
    image_dir = _find_image_dir(root, ["1024x768", "512x384", "images", ""], sample)
    if image_dir is None:
        raise _missing("koniq10k", root, f"image folder 1024x768/ (with {sample!r})")
    records, _ = _table_records(path, header, rows, "image_name", label or "MOS_zscore", image_dir)
    official = None
    sets_path = os.path.join(root, "koniq10k_distributions_sets.csv")
    if os.path.isfile(sets_path):
        sh, srows = _read_csv(sets_path)
        _require_columns(sets_path, sh, ["image_name", "set"])
        official = {}
        for i, row in enumerate(srows):
            name = _check_name(row.get("image_name"), sets_path, i + 2, "image_name")
            s = (row.get("set") or "").strip().lower()
            s = {"training": "train", "validation": "val"}.get(s, s)
            if s not in ("train", "val", "test"):
                raise LabelFileError(
                    f"{sets_path}, row {i + 2}, column 'set': {row.get('set')!r} is not "
                    "training / validation / test")
            official[name] = s
    return records, official, sets_path


def _read_spaq(root: str, label: str | None):
    candidates = [os.path.join(root, "Annotations", "MOS and Image attribute scores.xlsx"),
                  os.path.join(root, "MOS and Image attribute scores.xlsx"),
                  os.path.join(root, "Annotations", "MOS and Image attribute scores.csv"),
                  os.path.join(root, "mos.csv")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        raise _missing("spaq", root, "'Annotations/MOS and Image attribute scores.xlsx'")
    if path.endswith(".xlsx"):
        table = read_xlsx(path)
        if not table:
            raise LabelFileError(f"{path}: empty sheet")
        header = [h.strip() for h in table[0]]
        rows = [dict(zip(header, (c.strip() for c in r))) for r in table[1:]
                if any(c.strip() for c in r)]
    else:
        header, rows = _read_csv(path)
    sample = rows[0].get("Image name", "") if rows else ""
    image_dir = _find_image_dir(root, ["TestImage", "images", ""], sample)
    if image_dir is None:
        raise _missing("spaq", root, f"image folder TestImage/ (with {sample!r})")
    records, _ = _table_records(path, header, rows, "Image name", label or "MOS", image_dir)
    return records, None, None


def _read_kadid(root: str, label: str | None):
    path = os.path.join(root, "dmos.csv")
    if not os.path.isfile(path):
        raise _missing("kadid10k", root, "dmos.csv")
    header, rows = _read_csv(path)
    sample = rows[0].get("dist_img", "") if rows else ""
    image_dir = _find_image_dir(root, ["images", ""], sample)
    if image_dir is None:
        raise _missing("kadid10k", root, f"image folder images/ (with {sample!r})")
    records, _ = _table_records(path, header, rows, "dist_img", label or "dmos", image_dir,
                                ref_col="ref_img")
    return records, None, None


def _read_agiqa(root: str, label: str | None):
    path = os.path.join(root, "data.csv")
    if not os.path.isfile(path):
        raise _missing("agiqa3k", root, "data.csv")
    header, rows = _read_csv(path)
    sample = rows[0].get("name", "") if rows else ""
    image_dir = _find_image_dir(root, ["images", "AGIQA-3K", "AGIQA-3k", "image", ""], sample)
    if image_dir is None:
        raise _missing("agiqa3k", root, f"image folder (with {sample!r})")
    records, _ = _table_records(path, header, rows, "name", label or "mos_quality", image_dir)
    return records, None, None


def _read_livec(root: str, label: str | None):
    from scipy import io as sio

    mos_path = os.path.join(root, "Data", "AllMOS_release.mat")
    names_path = os.path.join(root, "Data", "AllImages_release.mat")
    for p in (mos_path, names_path):
        if not os.path.isfile(p):
            raise _missing("livec", root, os.path.relpath(p, root))

    def _load(p, key):
        try:
            m = sio.loadmat(p)
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
        name = _check_name(name, names_path, i + 1, "AllImages_release")
        try:
            score = _parse_score(np.asarray(mos[i], dtype=np.float64).reshape(-1)[0],
                                 mos_path, i + 1, mos_key)
        except (TypeError, ValueError, IndexError):
            raise LabelFileError(
                f"{mos_path}, entry {i + 1}, variable {mos_key!r}: not a number") from None
        records.append(Record(os.path.abspath(os.path.join(root, "Images", name)), score, name))
        rows.append(i + 1)
    _check_duplicates([(r.image_id, n) for r, n in zip(records, rows)], names_path,
                      "AllImages_release")
    _check_exist(records, rows, names_path, "AllImages_release")
    return records, None, None


PATH_COLUMNS = ("path", "image", "image_path", "image_name", "img_path", "filename", "file",
                "name", "dist_img")
SCORE_COLUMNS = ("score", "mos", "MOS", "dmos", "mos_quality", "label", "quality")


def _resolve_manifest(root: str) -> str:
    if os.path.isfile(root):
        return root
    for n in ("manifest.csv", "manifest.json"):
        if os.path.isfile(os.path.join(root, n)):
            return os.path.join(root, n)
    raise _missing("manifest", root, "manifest.csv / manifest.json")


def _read_manifest(root: str, label: str | None, path_column: str | None = None):
    path = _resolve_manifest(root)
    base = os.path.dirname(os.path.abspath(path))
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LabelFileError(f"{path}: not valid JSON ({e})") from None
        if isinstance(data, dict):
            data = data.get("images", data.get("data"))
        if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
            raise LabelFileError(f"{path}: expected a JSON list of objects (one per image)")
        header = sorted({k for d in data for k in d})
        rows = [{k: (None if d.get(k) is None else str(d.get(k))) for k in header} for d in data]
        first_row = 1  # JSON: entry number, 1-based.
    else:
        header, rows = _read_csv(path)
        first_row = 2
    name_col = path_column or next((c for c in PATH_COLUMNS if c in header), None)
    score_col = label or next((c for c in SCORE_COLUMNS if c in header), None)
    if name_col is None or score_col is None:
        raise LabelFileError(
            f"{path}: cannot tell the {'path' if name_col is None else 'score'} column; "
            f"header {header}. Name it ({PATH_COLUMNS if name_col is None else SCORE_COLUMNS}) "
            "or pass it (path_column= / label=).")
    ref_col = "ref" if "ref" in header else None
    records, row_numbers = _table_records(path, header, rows, name_col, score_col, base,
                                          ref_col=ref_col, first_row=first_row)
    official = None
    if "split" in header:
        official = {}
        for r, row, n in zip(records, rows, row_numbers):
            s = (row.get("split") or "").strip().lower()
            s = {"training": "train", "validation": "val", "valid": "val"}.get(s, s)
            if s not in ("train", "val", "test"):
                raise LabelFileError(
                    f"{path}, row {n}, column 'split': {row.get('split')!r} is not train / "
                    "val / test")
            official[r.image_id] = s
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
    path = rel if os.path.isabs(rel) else os.path.join(root if os.path.isdir(root)
                                                      else os.path.dirname(root), rel)
    if not os.path.isfile(path):
        raise LabelFileError(f"split list {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelFileError(f"{path}: not valid JSON ({e})") from None
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


_READERS = {
    "koniq10k": _read_koniq,
    "spaq": _read_spaq,
    "kadid10k": _read_kadid,
    "agiqa3k": _read_agiqa,
    "livec": _read_livec,
    "manifest": _read_manifest,
    "demo": _read_manifest,
}


def load_records(name: str, root: str, split: str, *, label: str | None = None, seed: int = 0,
                 split_ratio: float = 0.8, path_column: str | None = None) -> list[Record]:
    """The labelled images of data set `name` under `root` for `split` (see module doc).

    label: the score column (KonIQ default MOS_zscore; SPAQ MOS; KADID dmos; AGIQA-3K
    mos_quality; LIVE Challenge the .mat variable AllMOS_release; manifest: score/mos/...).
    path_column: manifest only, the image-path column. Records keep the label
    file's order (json splits: the list's order).
    """
    if name not in _READERS:
        close = difflib.get_close_matches(str(name), DATASETS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(f"unknown data set {name!r}; {hint}choose one of {', '.join(DATASETS)}")
    if name == "demo" and not root:
        from hyperiqa_jax.data.demo import ensure_demo_dataset

        root = ensure_demo_dataset()
    if not root:
        hint = DOWNLOAD_HELP[name].replace("ROOT", "it")
        raise DatasetNotFoundError(f"{name}: no data root given (config.data.root). {hint}")
    if not os.path.exists(root):
        raise DatasetNotFoundError(
            f"{name}: data root {root!r} does not exist (config.data.root). Expected layout: "
            + DOWNLOAD_HELP[name].replace("ROOT", "it"))
    label = label or None
    if name in ("manifest", "demo"):
        records, official, split_file = _read_manifest(root, label, path_column)
    else:
        records, official, split_file = _READERS[name](root, label)

    split = (split or "").strip()
    out = _select(name, root, split, records, official, split_file, seed, split_ratio)
    if not out:
        raise ConfigError(f"{name}: split {split!r} of {root!r} is empty")
    return out


def _select(name, root, split, records, official, split_file, seed, split_ratio):
    mode, _, part = split.partition(":") if ":" in split else ("", "", split)
    if mode == "json":
        return _json_split(records, root, part)
    part = {"training": "train", "validation": "val", "valid": "val"}.get(part, part)
    if part == "all" and mode in ("", "all"):
        return list(records)
    if part not in ("train", "val", "test"):
        raise ConfigError(f"unknown split {split!r}: use all, train, val, test, official:PART, "
                         "random:train / random:test or json:PATH")
    if mode == "":
        mode = "official" if (official is not None or name == "koniq10k") else "random"
    if mode == "official":
        if official is None:
            if name == "koniq10k":
                raise _missing("koniq10k", root, "koniq10k_distributions_sets.csv (official "
                               "split; or use split 'random:train' / 'random:test')")
            raise ConfigError(f"{name}: no official split in the labels; use 'random:{part}'")
        missing = [r.image_id for r in records if r.image_id not in official]
        if missing and name == "koniq10k":
            raise LabelFileError(f"{split_file}: {len(missing)} labelled image(s) have no set, "
                                 f"e.g. {missing[:3]}")
        return [r for r in records if official.get(r.image_id) == part]
    if mode == "random":
        return _random_split(records, part, seed, split_ratio)
    raise ConfigError(f"unknown split mode {mode!r} in {split!r}")

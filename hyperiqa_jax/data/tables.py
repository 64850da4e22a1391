"""Label tables: CSV, JSON and .xlsx readers and the per-cell checks the data-set readers share.

Problems raise `LabelFileError` naming the file, the row and the column. Files
may be local or URLs (paths.py).
"""

import csv
import io
import json
import math
import os
import posixpath
import re
import xml.etree.ElementTree as ET
import zipfile

from etils import epath

from hyperiqa_jax.errors import LabelFileError
from hyperiqa_jax.paths import is_url, read_bytes


def read_text(path: str) -> str:
    try:
        return read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        kind = "JSON" if path.endswith(".json") else "CSV"
        raise LabelFileError(f"{path}: not a UTF-8 text {kind} file ({e})") from None


def read_json(path: str):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise LabelFileError(f"{path}: not valid JSON ({e})") from None


def read_table(path: str) -> tuple[list[str], list[dict[str, str]]]:
    """(header, rows as {column: text}) of a CSV or .xlsx file; cells are stripped."""
    if path.endswith(".xlsx"):
        table = read_xlsx(path)
        if not table:
            raise LabelFileError(f"{path}: empty sheet")
        header = [h.strip() for h in table[0]]
        rows = [dict(zip(header, (c.strip() for c in r))) for r in table[1:]
                if any(c.strip() for c in r)]
        return header, rows
    try:
        reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
        header = [h.strip() for h in (reader.fieldnames or [])]
        rows = [{(k or "").strip(): (v.strip() if isinstance(v, str) else v)
                 for k, v in row.items()} for row in reader]
    except csv.Error as e:
        raise LabelFileError(f"{path}: malformed CSV ({e})") from None
    if not header:
        raise LabelFileError(f"{path}: empty file, no CSV header")
    return header, rows


def read_xlsx(path) -> list[list[str]]:
    """Rows of the first sheet of an .xlsx file as strings (no openpyxl needed)."""
    ns = {"m": "http://schemas.openxmlformats.org/spreadsheetml/2006/main"}
    try:
        with zipfile.ZipFile(io.BytesIO(read_bytes(path))) as z:
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


def require_columns(path: str, header: list[str], columns: list[str]) -> None:
    missing = [c for c in columns if c not in header]
    if missing:
        raise LabelFileError(
            f"{path}: missing column(s) {missing}; the header has {header}")


def parse_score(value, path: str, row: int, column: str) -> float:
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


def check_name(value, path: str, row: int, column: str) -> str:
    if value is None or str(value).strip() == "":
        raise LabelFileError(f"{path}, row {row}, column {column!r}: empty image name")
    return str(value).strip()


def check_duplicates(items: list[tuple[str, int]], path: str, column: str) -> None:
    """items: (image name, row); the second occurrence of a name is an error."""
    seen: dict[str, int] = {}
    for name, row in items:
        if name in seen:
            raise LabelFileError(
                f"{path}, row {row}, column {column!r}: duplicate image name {name!r} "
                f"(first at row {seen[name]})")
        seen[name] = row


def check_files_exist(paths: list[str], rows: list[int], label_path: str, column: str) -> None:
    """Every image a label file lists must exist (one error naming up to 5 rows)."""
    listed: dict[str, set[str]] = {}

    def found(path: str) -> bool:
        if not is_url(path):
            return os.path.isfile(path)
        # One listing per folder instead of one request per image.
        folder = posixpath.dirname(path)
        if folder not in listed:
            p = epath.Path(folder)
            listed[folder] = {c.name for c in p.iterdir()} if p.is_dir() else set()
        return posixpath.basename(path) in listed[folder]

    missing = [(p, row) for p, row in zip(paths, rows) if not found(p)]
    if missing:
        shown = "; ".join(f"row {row}: {p}" for p, row in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise LabelFileError(
            f"{label_path}, column {column!r}: {len(missing)} listed image file(s) missing: "
            f"{shown}{more}")

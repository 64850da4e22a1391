"""Readers of every data set's published label format, splits and label-file errors."""

import json
import os
import zipfile

import numpy as np
import pytest
from scipy import io as sio

from hyperiqa_jax.data.records import (
    DatasetNotFoundError,
    LabelFileError,
    Record,
    load_records,
)
from hyperiqa_jax.data.tables import read_xlsx
from tests.data.conftest import make_image, write_manifest

# ----------------------------------------------------------------------------- builders


def _write(path, text):
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_koniq(root, n=10, sets=True):
    rows = ['"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","MOS_zscore"']
    srows = ['"image_name","c1","c2","c3","c4","c5","c_total","MOS","SD","set"']
    for i in range(n):
        name = f"{1000 + i}.jpg"
        make_image(os.path.join(root, "1024x768", name), 24, 32, seed=i)
        rows.append(f'"{name}",1,2,3,4,5,15,{3 + i / 10:.2f},0.5,{40 + i:.4f}')
        s = ["training", "training", "training", "validation", "test"][i % 5]
        srows.append(f'"{name}",1,2,3,4,5,15,{3 + i / 10:.2f},0.5,"{s}"')
    _write(os.path.join(root, "koniq10k_scores_and_distributions.csv"), "\n".join(rows) + "\n")
    if sets:
        _write(os.path.join(root, "koniq10k_distributions_sets.csv"), "\n".join(srows) + "\n")
    return str(root)


def write_xlsx(path, table):
    """A minimal but valid .xlsx (shared strings for text, numbers inline)."""
    strings, index = [], {}
    cells_xml = []
    for r, row in enumerate(table, start=1):
        cells = []
        for c, value in enumerate(row):
            ref = f"{chr(65 + c)}{r}"
            if isinstance(value, str):
                if value not in index:
                    index[value] = len(strings)
                    strings.append(value)
                cells.append(f'<c r="{ref}" t="s"><v>{index[value]}</v></c>')
            else:
                cells.append(f'<c r="{ref}"><v>{value}</v></c>')
        cells_xml.append(f'<row r="{r}">{"".join(cells)}</row>')
    ns = 'xmlns="http://schemas.openxmlformats.org/spreadsheetml/2006/main"'
    rel = 'xmlns:r="http://schemas.openxmlformats.org/officeDocument/2006/relationships"'
    data = "".join(cells_xml)
    sheet = f'<?xml version="1.0"?><worksheet {ns}><sheetData>{data}</sheetData></worksheet>'
    sst = "".join(f"<si><t>{s}</t></si>" for s in strings)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("[Content_Types].xml", '<?xml version="1.0"?><Types xmlns="http://schemas.'
                   'openxmlformats.org/package/2006/content-types"/>')
        z.writestr("xl/workbook.xml", f'<?xml version="1.0"?><workbook {ns} {rel}><sheets>'
                   '<sheet name="Sheet1" sheetId="1" r:id="rId1"/></sheets></workbook>')
        z.writestr("xl/sharedStrings.xml", f'<?xml version="1.0"?><sst {ns}>{sst}</sst>')
        z.writestr("xl/worksheets/sheet1.xml", sheet)


def make_spaq(root, n=6):
    table = [["Image name", "MOS", "Brightness", "Colorfulness"]]
    for i in range(n):
        name = f"{i:05d}.jpg"
        make_image(os.path.join(root, "TestImage", name), 24, 32, seed=i)
        table.append([name, 20.5 + i, 50, 60])
    os.makedirs(os.path.join(root, "Annotations"))
    write_xlsx(os.path.join(root, "Annotations", "MOS and Image attribute scores.xlsx"), table)
    return str(root)


def make_kadid(root, refs=5, per_ref=3):
    rows = ["dist_img,ref_img,dmos,var"]
    for r in range(refs):
        for k in range(per_ref):
            name = f"I{r + 1:02d}_{k + 1:02d}_01.png"
            make_image(os.path.join(root, "images", name), 20, 24, seed=r * 10 + k)
            rows.append(f"{name},I{r + 1:02d}.png,{4.5 - k * 0.5},0.3")
    _write(os.path.join(root, "dmos.csv"), "\n".join(rows) + "\n")
    return str(root)


def make_agiqa(root, n=5):
    rows = ["name,prompt,adj1,adj2,style,mos_quality,std_quality,mos_align,std_align"]
    for i in range(n):
        name = f"AttnGAN_normal_{i:03d}.jpg"
        make_image(os.path.join(root, "AGIQA-3K", name), 20, 24, seed=i)
        rows.append(f'{name},"a cat, on a mat",red,,baroque,{1.5 + i / 4},0.5,{3 + i / 5},0.4')
    _write(os.path.join(root, "data.csv"), "\n".join(rows) + "\n")
    return str(root)


def make_livec(root, n=12):
    os.makedirs(os.path.join(root, "Data"))
    names = np.empty((n, 1), dtype=object)
    for i in range(n):
        name = f"t{i + 1}.bmp" if i < 7 else f"{i + 100}.bmp"
        names[i, 0] = np.array([name])
        folder = os.path.join(root, "Images", "trainingImages" if i < 7 else "")
        make_image(os.path.join(folder, name), 20, 24, seed=i)
    sio.savemat(os.path.join(root, "Data", "AllImages_release.mat"), {"AllImages_release": names})
    mos = np.linspace(20, 80, n).reshape(1, n)
    sio.savemat(os.path.join(root, "Data", "AllMOS_release.mat"), {"AllMOS_release": mos})
    return str(root)


# ----------------------------------------------------------------------------- readers


def test_koniq_official_split_and_label(tmp_path):
    root = make_koniq(tmp_path / "koniq")
    train = load_records("koniq10k", root, "train")
    val = load_records("koniq10k", root, "val")
    test = load_records("koniq10k", root, "test")
    assert (len(train), len(val), len(test)) == (6, 2, 2)
    assert isinstance(train[0], Record) and train[0].score == 40.0  # MOS_zscore by default
    assert os.path.isfile(train[0].path) and train[0].image_id == "1000.jpg"
    assert load_records("koniq10k", root, "official:test") == test
    mos = load_records("koniq10k", root, "all", label="MOS")
    assert len(mos) == 10 and mos[0].score == 3.0


def test_koniq_without_sets_file(tmp_path):
    root = make_koniq(tmp_path / "koniq", sets=False)
    with pytest.raises(DatasetNotFoundError, match="koniq10k_distributions_sets.csv"):
        load_records("koniq10k", root, "train")
    assert len(load_records("koniq10k", root, "random:train")) == 8


def test_koniq_json_lists(tmp_path):
    root = make_koniq(tmp_path / "koniq")
    (tmp_path / "koniq" / "koniq_train.json").write_text(json.dumps(["1003.jpg", "1001.jpg"]))
    (tmp_path / "koniq" / "koniq_test.json").write_text(
        json.dumps([{"image": "1024x768/1005.jpg", "score": 1.0}]))
    tr = load_records("koniq10k", root, "json:koniq_train.json")
    assert [r.image_id for r in tr] == ["1003.jpg", "1001.jpg"]
    assert [r.image_id for r in load_records("koniq10k", root, "json:koniq_test.json")] == [
        "1005.jpg"]
    (tmp_path / "koniq" / "bad.json").write_text(json.dumps(["1003.jpg", "9999.jpg"]))
    with pytest.raises(LabelFileError, match=r"bad.json, entry 2: image '9999.jpg'"):
        load_records("koniq10k", root, "json:bad.json")


def test_random_split_is_seeded_and_disjoint(tmp_path):
    root = make_koniq(tmp_path / "koniq", n=20)
    a = load_records("koniq10k", root, "random:train", seed=3)
    b = load_records("koniq10k", root, "random:test", seed=3)
    assert len(a) == 16 and len(b) == 4
    assert not {r.image_id for r in a} & {r.image_id for r in b}
    assert a == load_records("koniq10k", root, "random:train", seed=3)
    assert a != load_records("koniq10k", root, "random:train", seed=4)
    assert len(load_records("koniq10k", root, "random:train", split_ratio=0.5)) == 10


def test_spaq_xlsx(tmp_path):
    root = make_spaq(tmp_path / "spaq")
    table = read_xlsx(os.path.join(root, "Annotations", "MOS and Image attribute scores.xlsx"))
    assert table[0][:2] == ["Image name", "MOS"]
    recs = load_records("spaq", root, "all")
    assert len(recs) == 6 and recs[1].score == 21.5 and recs[1].image_id == "00001.jpg"
    assert len(load_records("spaq", root, "train")) + len(load_records("spaq", root, "test")) == 6


def test_kadid_split_by_reference(tmp_path):
    root = make_kadid(tmp_path / "kadid")
    recs = load_records("kadid10k", root, "all")
    assert len(recs) == 15 and recs[0].ref == "I01.png" and recs[0].score == 4.5
    train = load_records("kadid10k", root, "train", seed=1)
    test = load_records("kadid10k", root, "test", seed=1)
    assert len(train) == 12 and len(test) == 3
    assert not {r.ref for r in train} & {r.ref for r in test}


def test_agiqa(tmp_path):
    root = make_agiqa(tmp_path / "agiqa")
    recs = load_records("agiqa3k", root, "all")
    assert len(recs) == 5 and recs[0].score == 1.5
    assert load_records("agiqa3k", root, "all", label="mos_align")[0].score == 3.0


def test_livec_mat(tmp_path):
    root = make_livec(tmp_path / "livec")
    recs = load_records("livec", root, "all")
    assert len(recs) == 5  # the 7 practice images are left out
    assert recs[0].image_id == "107.bmp" and os.path.isfile(recs[0].path)
    np.testing.assert_allclose([r.score for r in recs], np.linspace(20, 80, 12)[7:])


def test_manifest_csv_and_json(tmp_path):
    root = write_manifest(tmp_path / "m", n=8)
    train = load_records("manifest", root, "train")
    test = load_records("manifest", root, "test")
    assert len(train) == 6 and len(test) == 2 and train[0].ref == "r0"
    assert load_records("manifest", os.path.join(root, "manifest.csv"), "all")[3].score == 30.0
    entries = [{"file": f"img/{i:03d}.jpg", "quality": i} for i in range(3)]
    (tmp_path / "m" / "list.json").write_text(json.dumps(entries))
    recs = load_records("manifest", str(tmp_path / "m" / "list.json"), "all")
    assert [r.score for r in recs] == [0.0, 1.0, 2.0]
    rows = "where,value\nimg/000.jpg,1\n"
    (tmp_path / "m" / "custom.csv").write_text(rows)
    with pytest.raises(LabelFileError, match="cannot tell the path column"):
        load_records("manifest", str(tmp_path / "m" / "custom.csv"), "all")
    recs = load_records("manifest", str(tmp_path / "m" / "custom.csv"), "all", label="value",
                        path_column="where")
    assert recs[0].score == 1.0


# ----------------------------------------------------------------------------- errors


def test_missing_root_says_what_to_download(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="koniq10k_scores_and_distributions.csv"):
        load_records("koniq10k", str(tmp_path), "train")
    with pytest.raises(DatasetNotFoundError, match="dmos.csv"):
        load_records("kadid10k", str(tmp_path / "nope"), "all")
    with pytest.raises(DatasetNotFoundError, match="AllMOS_release.mat"):
        load_records("livec", str(tmp_path), "all")
    with pytest.raises(DatasetNotFoundError, match="no data root"):
        load_records("spaq", "", "all")
    with pytest.raises(ValueError, match="unknown data set"):
        load_records("imagenet", str(tmp_path), "all")


def _manifest(tmp_path, text):
    folder = tmp_path / "bad"
    for i in range(3):
        make_image(str(folder / f"{i}.jpg"), 8, 8, seed=i)
    (folder / "manifest.csv").write_text(text)
    return str(folder / "manifest.csv")


@pytest.mark.parametrize("text, pattern", [
    ("path,score\n0.jpg,1\n1.jpg,nan\n", r"manifest.csv, row 3, column 'score': score is nan"),
    ("path,score\n0.jpg,\n", r"manifest.csv, row 2, column 'score': empty score"),
    ("path,score\n0.jpg,good\n", r"row 2, column 'score': score 'good' is not a number"),
    ("path,score\n0.jpg,1\n1.jpg,2\n0.jpg,3\n",
     r"row 4, column 'path': duplicate image name '0.jpg' \(first at row 2\)"),
    ("path,score\n0.jpg,1\n7.jpg,2\n", r"column 'path': 1 listed image file\(s\) missing: row 3"),
    ("path,score\n,1\n", r"row 2, column 'path': empty image name"),
    ("path,score,split\n0.jpg,1,holdout\n", r"row 2, column 'split': 'holdout'"),
])
def test_label_file_errors(tmp_path, text, pattern):
    with pytest.raises(LabelFileError, match=pattern):
        load_records("manifest", _manifest(tmp_path, text), "all")


def test_missing_column_names_file_and_column(tmp_path):
    root = make_kadid(tmp_path / "kadid", refs=1, per_ref=1)
    (tmp_path / "kadid" / "dmos.csv").write_text("dist_img,ref_img,var\nI01_01_01.png,I01.png,1\n")
    with pytest.raises(LabelFileError, match=r"dmos.csv: missing column\(s\) \['dmos'\]"):
        load_records("kadid10k", root, "all")


def test_koniq_nan_and_duplicate(tmp_path):
    root = make_koniq(tmp_path / "k", n=3, sets=False)
    p = os.path.join(root, "koniq10k_scores_and_distributions.csv")
    lines = open(p).read().splitlines()
    lines[2] = lines[2].rsplit(",", 1)[0] + ",NaN"
    open(p, "w").write("\n".join(lines) + "\n")
    with pytest.raises(LabelFileError, match="row 3, column 'MOS_zscore': score is nan"):
        load_records("koniq10k", root, "all")
    lines[2] = lines[1]
    open(p, "w").write("\n".join(lines) + "\n")
    with pytest.raises(LabelFileError, match="duplicate image name '1000.jpg'"):
        load_records("koniq10k", root, "all")


def test_unknown_split(tmp_path):
    root = write_manifest(tmp_path / "m", n=4)
    with pytest.raises(ValueError, match="unknown split"):
        load_records("manifest", root, "holdout")
    with pytest.raises(ValueError, match="only 'train' and 'test'"):
        load_records("manifest", root, "random:val")
    with pytest.raises(ValueError, match="split 'val' of .* is empty"):
        load_records("manifest", root, "val")

"""The wheel holds the package alone, and its commands run from any folder on a config path.

configs/ and benchmarks/ are folders of the repository, read by path or run from a
checkout; only hyperiqa_jax and weights_conversion are installed.
"""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests import train_utils

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory):
    """The project's wheel, built here without network access and unpacked into a folder."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(REPO)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = out.glob("hyperiqa_jax-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_the_wheel_installs_the_two_packages_only(wheel_site):
    top = {p.name for p in wheel_site.iterdir() if not p.name.endswith(".dist-info")}
    assert top == {"hyperiqa_jax", "weights_conversion"}
    assert (wheel_site / "hyperiqa_jax" / "config_defaults.py").is_file()
    assert (wheel_site / "hyperiqa_jax" / "data" / "tables.py").is_file()


def test_train_predict_and_evaluate_run_from_another_folder(wheel_site, tmp_path):
    from hyperiqa_jax.data import demo

    root = tmp_path / "data"
    demo.generate_demo_dataset(str(root), size=56,
                               sources={"astronaut": (1, "train"), "camera": (1, "test")})
    config = train_utils.tiny_config(root=str(root))
    config.train.update(epochs=1, max_steps=2)
    config_file = train_utils.write_config_file(tmp_path / "tiny.py", config)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The unpacked wheel first on the path, started from a folder without the checkout.
    env = {"PYTHONPATH": str(wheel_site), "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}

    def command(*args):
        out = subprocess.run([sys.executable, "-m", *args], cwd=elsewhere, env=env,
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    where = subprocess.run(
        [sys.executable, "-c", "import hyperiqa_jax, weights_conversion as w; "
         "print(hyperiqa_jax.__file__, w.__file__)"], cwd=elsewhere, env=env,
        capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(wheel_site)) for path in where), where
    command("hyperiqa_jax.train", f"--config={config_file}", "--workdir=run")
    image = next(p for p in root.rglob("*") if p.suffix in (".png", ".jpg"))
    command("hyperiqa_jax.predict", "--checkpoint=run", "--output=scores.csv", str(image))
    rows = (elsewhere / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("path,score") and len(rows) == 2
    command("hyperiqa_jax.evaluate", "--checkpoint=run", f"--data=demo:test={root}",
            "--out=eval")
    assert (elsewhere / "eval").is_dir()

"""Every command fails cleanly on a user's mistake, and still shows a bug's traceback.

A mistake: exit status 2, one `error: ...` line, no traceback (hyperiqa_jax/cli.py).
Each case runs the real command in a subprocess; none of them trains a step.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hyperiqa_jax import cli, data, errors
from tests import train_utils

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    # No allocator re-execution (tested in test_allocator.py), and a private data cache.
    cache = tmp_path_factory.mktemp("cache")
    return dict(os.environ, HYPERIQA_ALLOCATOR="system", HYPERIQA_JAX_CACHE=str(cache))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The things a new user points the commands at by mistake."""
    d = tmp_path_factory.mktemp("mistakes")
    (d / "a_file").write_text("not a folder")
    (d / "texts").mkdir()
    (d / "texts" / "notes.txt").write_text("no images here")
    wrong = d / "wrong_columns"
    wrong.mkdir()
    (wrong / "manifest.csv").write_text("picture,quality\nx.jpg,3.5\n")
    train_utils.write_manifest_dataset(str(d / "manifest"), n_train=4, n_test=2)
    bad = d / "corrupt"
    train_utils.write_manifest_dataset(str(bad), n_train=4, n_test=2)
    for image in (bad / "images").iterdir():
        image.write_bytes(b"\xff\xd8 not a jpeg after all")
    # A checkpoint folder whose step has no readable meta item.
    (d / "broken_run" / "best" / "3" / "state").mkdir(parents=True)
    (d / "broken_run" / "best" / "3" / "meta").mkdir()
    # A config file: the tiny test model on the corrupt images.
    (d / "tiny_corrupt.py").write_text(
        "from tests import train_utils\n\n\ndef get_config():\n"
        f"    return train_utils.tiny_config({str(bad)!r}, 'manifest')\n")
    return d


def run(env, module, *args):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


DEMO = "--config=configs/demo.py"
TRAIN_MISTAKES = {
    "config file missing": ([
        "--config=configs/nope.py"], ["configs/nope.py: no such config file"]),
    "mistyped override": ([
        DEMO, "--config.train.batchsize=4"],
        ["--config.train.batchsize=4", "no config key 'batchsize'", "batch_size"]),
    "value of the wrong type": ([
        DEMO, "--config.train.lr=fast"], ["--config.train.lr=fast"]),
    "zero batch": ([
        DEMO, "--config.train.batch_size=0"], ["train.batch_size=0 must be at least 1"]),
    "unknown backbone": ([
        DEMO, "--config.model.backbone=swin_tiny"],
        ["model.backbone='swin_tiny'", "did you mean 'swin_tiny_patch4_window7_224'"]),
    "not a config file": (["--config=README.md"], ["README.md, line", "get_config()"]),
    "missing data root": ([
        "--config=configs/base.py", "--config.data.root={d}/nowhere"],
        ["koniq10k: data root", "does not exist", "koniq10k_scores_and_distributions.csv"]),
    "pretrained backbone missing": ([
        DEMO, "--config.pretrained_backbone={d}/no_weights"],
        ["pretrained_backbone", "does not exist", "weights_conversion.convert_timm"]),
    "label file with wrong columns": ([
        DEMO, "--config.data.name=manifest", "--config.data.root={d}/wrong_columns"],
        ["manifest.csv"]),
}


# The same checks without a subprocess: values check_config rejects before any set-up.
CONFIG_MISTAKES = {
    "train.log_every_steps": (0, "train.log_every_steps=0 must be at least 1"),
    "train.checkpoint_every_steps": (0, "must be at least 1"),
    "data.test_crops": (0, "data.test_crops=0 must be at least 1"),
    "data.num_workers": (-1, "must be at least 0"),
    "train.lr": (0.0, "train.lr=0.0 must be positive"),
    "data.max_bad_fraction": (1.5, "must be between 0 and 1"),
    "data.eval_protocol": ("grdi", "did you mean 'grid'"),
    "data.name": ("konig10k", "did you mean 'koniq10k'"),
    "train.loss": ("mse", "train.loss='mse' is not one of l1, smooth_l1"),
    "train.schedule": ("cosine", "did you mean"),
    "model.attention": ("chanel", "did you mean 'channel'"),
    "data.resize": ((40, 40), "smaller than data.crop_size"),  # the tiny crop is 56
}


@pytest.mark.parametrize("key", sorted(CONFIG_MISTAKES))
def test_config_mistakes(key):
    from hyperiqa_jax import train

    value, fragment = CONFIG_MISTAKES[key]
    config = train_utils.tiny_config()
    section, name = key.split(".")
    with config.unlocked():
        config[section][name] = value
    with pytest.raises(errors.ConfigError, match=re.escape(fragment)):
        train.check_config(config)


def test_unknown_split_is_a_config_error(files):
    with pytest.raises(errors.ConfigError, match="unknown split 'tset'"):
        data.load_records("manifest", str(files / "manifest"), "tset")


@pytest.mark.parametrize("case", sorted(TRAIN_MISTAKES))
def test_train_mistakes(case, env, files):
    args, fragments = TRAIN_MISTAKES[case]
    args = [a.format(d=files) for a in args] + [f"--workdir={files}/runs/{case}"]
    assert_user_error(run(env, "hyperiqa_jax.train", *args), *fragments)


@pytest.mark.parametrize("workdir", ["a_file", "a_file/sub"])
def test_train_workdir_is_a_file(workdir, env, files):
    proc = run(env, "hyperiqa_jax.train", DEMO, f"--workdir={files / workdir}")
    assert_user_error(proc, "is a file, not a folder")


def test_train_required_flags(env):
    assert_user_error(run(env, "hyperiqa_jax.train", DEMO), "--config and --workdir are required")


def test_too_many_corrupt_images_is_one_line(env, files):
    # Found by train's check of a sample of the images, before the model is compiled.
    proc = run(env, "hyperiqa_jax.train", f"--config={files / 'tiny_corrupt.py'}",
               f"--workdir={files / 'corrupt_run'}")
    assert_user_error(proc, "failed to decode, more than data.max_bad_fraction=0.0",
                      "raise data.max_bad_fraction")


def test_too_many_corrupt_images_is_caught_by_type(files, capsys):
    # Beyond the sample, the input pipeline raises it from grain's threads during training.
    config = train_utils.tiny_config(str(files / "corrupt"), "manifest")
    records = data.load_records("manifest", config.data.root, "train")
    stream = iter(data.make_train_dataset(records, config.data, batch_size=2, seed=0))
    assert cli.guarded(lambda: next(stream))() == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    assert "more than data.max_bad_fraction" in err[-1]


PREDICT_MISTAKES = {
    "checkpoint missing": ([
        "--checkpoint={d}/no_run", "{d}/manifest/images"], ["does not exist", "training workdir"]),
    "checkpoint broken": ([
        "--checkpoint={d}/broken_run", "{d}/manifest/images"], ["meta item cannot be read"]),
    # Found before the checkpoint is looked at.
    "folder without images": (["--checkpoint={d}/no_run", "{d}/texts"], ["no image files"]),
    "output folder missing": ([
        "--checkpoint={d}/no_run", "--output={d}/nowhere/scores.csv", "{d}/manifest/images"],
        ["does not exist; create it first"]),
    "report is a folder": ([
        "--checkpoint={d}/no_run", "--report={d}/texts", "{d}/manifest/images"],
        ["is a folder"]),
    "zero batch": ([
        "--checkpoint={d}/no_run", "--batch_size=0", "{d}/manifest/images"],
        ["--batch_size=0 must be at least 1"]),
    "no checkpoint flag": (["{d}/manifest/images"], ["--checkpoint is required"]),
    "unknown flag": (["--checkpiont={d}/no_run", "{d}/texts"], ["checkpiont"]),
}


@pytest.mark.parametrize("case", sorted(PREDICT_MISTAKES))
def test_predict_mistakes(case, env, files):
    args, fragments = PREDICT_MISTAKES[case]
    proc = run(env, "hyperiqa_jax.predict", *[a.format(d=files) for a in args])
    assert_user_error(proc, *fragments)


def test_evaluate_mistakes(env, files):
    proc = run(env, "hyperiqa_jax.evaluate", f"--checkpoint={files}/no_run",
               f"--data=koniq:test={files}")
    assert_user_error(proc, "unknown data set 'koniq'", "did you mean 'koniq10k'")
    proc = run(env, "hyperiqa_jax.evaluate", f"--checkpoint={files}/no_run",
               f"--data=manifest={files}/manifest")
    assert_user_error(proc, "does not exist")


def test_demo_mistyped_override(env, files):
    proc = run(env, "hyperiqa_jax.demo", "--config.train.batchsize=4",
               f"--workdir={files}/demo_run")
    assert_user_error(proc, "no config key 'batchsize'", "batch_size")


def test_conversion_commands_missing_config(env, files):
    proc = run(env, "weights_conversion.convert_checkpoint", "--config=configs/nope.py",
               f"--checkpoint={files}/x.pth", f"--out={files}/out")
    assert_user_error(proc, "no such config file")
    proc = run(env, "weights_conversion.validate_parity", "--config", "configs/nope.py")
    assert_user_error(proc, "no such config file")


# The commands whose main takes its own flag values, called in this process (cli.call).
IN_PROCESS_MISTAKES = {
    "complexity without config": ("hyperiqa_jax.complexity", [], "give at least one --config"),
    "complexity config missing": (
        "hyperiqa_jax.complexity", ["--config=configs/nope.py"], "no such config file"),
    "lowering without config": ("hyperiqa_jax.lowering", [], "--config is required"),
    "lowering unknown platform": (
        "hyperiqa_jax.lowering", ["--config=configs/tiny.py", "--platforms=cpu,gpu"],
        "unknown platform(s) ['gpu']"),
    "lowering zero batch": (
        "hyperiqa_jax.lowering", ["--config=configs/tiny.py", "--batch=0"], "--batch=0"),
    "convert_timm two sources": (
        "weights_conversion.convert_timm", ["--model=swin_tiny_patch4_window7_224",
                                            "--pretrained", "--checkpoint=x.pth", "--out=o"],
        "exactly one of --checkpoint FILE and --pretrained"),
    "validate_parity dashed flag": (
        "weights_conversion.validate_parity", ["--model=swin_tiny_patch4_window7_224",
                                               "--img-size=256"], "img-size"),
    "gpu_check without a results folder": ("benchmarks.gpu_check", [], "--out is required"),
    "unexpected argument": ("hyperiqa_jax.complexity", ["--config=configs/tiny.py", "extra"],
                            "unexpected arguments ['extra']"),
}


@pytest.mark.parametrize("case", sorted(IN_PROCESS_MISTAKES))
def test_in_process_mistakes(case, capsys):
    import importlib

    module, argv, fragment = IN_PROCESS_MISTAKES[case]
    command = importlib.import_module(module)
    assert cli.call(command.main, argv, define_flags=command.define_flags) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], lines


# ---------------------------------------------------------------------------- bugs

PLANTED_BUG = """
import sys
from hyperiqa_jax import cli, predict

def broken(patterns):
    raise RuntimeError("planted bug")

predict.expand_paths = broken
predict.define_flags()
sys.argv = ["predict", "--checkpoint=somewhere", "photo.jpg"]
cli.run(predict.main)
"""


def test_a_bug_keeps_its_traceback(env):
    proc = subprocess.run([sys.executable, "-c", PLANTED_BUG], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr and "RuntimeError: planted bug" in proc.stderr
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


@pytest.mark.parametrize("bug", [RuntimeError("x"), ValueError("x"), KeyError("x"),
                                 AttributeError("x"), ZeroDivisionError()])
def test_guarded_passes_bugs_through(bug):
    def main():
        raise bug

    with pytest.raises(type(bug)):
        cli.guarded(main)()


def test_guarded_reports_user_errors(capsys):
    for error in (errors.UserError("what to do"), errors.ConfigError("x=0 must be at least 1"),
                  FileNotFoundError(2, "No such file or directory", "/data/x.csv"),
                  data.LabelFileError("labels.csv, row 3: empty score")):
        def main(error=error):
            raise error

        assert cli.guarded(main)() == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: what to do", "error: x=0 must be at least 1",
        "error: /data/x.csv: No such file or directory",
        "error: labels.csv, row 3: empty score"]


def test_missing_extra_is_a_user_error(capsys):
    def main():
        import timm_is_not_this  # noqa: F401

    with pytest.raises(ModuleNotFoundError):
        cli.guarded(main)()

    def needs_torch():
        raise ModuleNotFoundError("No module named 'timm'", name="timm")

    assert cli.guarded(needs_torch)() == 2
    assert "'torch' extra" in capsys.readouterr().err

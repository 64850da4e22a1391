r"""A study: the runs behind the original's tables, planned, run and reported as one config.

    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo plan
    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo run
    python -m hyperiqa_jax.study --study=configs/studies/demo.py --root=runs/study-demo report

A study file (`configs/studies/*.py`, read by path; `--study=FILE:ARG` passes ARG
to it) defines `get_study(arg=None)` returning a dict:

    name         the study's name
    description  one line (optional)
    rows         [{"name": "E6", "config": "configs/base.py", "overrides": ["model.x=1"],
                   "about": "what the row changes"}]; config paths are relative to the
                 current folder (run from the repository root)
    seeds        one run per seed ([0] by default); or
    splits       N > 0: one run per random 80/20 split 0..N-1 (HyperIQA's protocol:
                 split i = config.seed i with data splits random:train / random:test)
    ablation     rows in order, each the baseline of the next (gains and their shares)
    sizes        rows of the size table (parameters, GFLOPs, scoring time)
    zero_shot    {label: "NAME[:SPLIT]"}: data sets the `cross_data` rows are scored on
    cross_data   rows evaluated zero-shot

Every run is one `train` into ROOT/runs/<row>/<seed|split> and one `evaluate` of
its test split (metrics, predictions, per-stage attention), plus one per zero-shot
data set for the cross_data rows. Data roots come from `--data LABEL=ROOT`, LABEL
being the training data set's name (koniq10k, demo, ...) or a zero-shot label;
the demo data set needs none. `--override=KEY=VALUE` changes every run's config
(e.g. train.epochs=8, for shortened runs).

    plan    writes ROOT/plan/: commands.sh (every run's train and evaluate commands),
            slurm_array.sbatch (one array task per run through launch/gpu_slurm.sbatch),
            tpu_commands.sh (one launch/tpu_pod.sh line per run) and plan.json. It
            schedules nothing.
    run     runs the pending runs here, one after another, each in its own process
            (logs in WORKDIR/logs/): a finished run is skipped, an interrupted one
            resumes exactly where its checkpoint left it; Ctrl-C or SIGTERM stops the
            current run at its next step boundary with a checkpoint. Exit status 1
            when a run failed.
    report  evaluates what is still unevaluated and writes ROOT/report/report.md,
            report.json and report.html (one self-contained page) with the tables
            and figures (hyperiqa_jax/study_report.py). Missing and failed runs are
            listed.

ROOT/study.json remembers the study, its overrides and data roots: later commands
on the same root may leave them out, and different overrides are refused (use a
new root).
"""

import dataclasses
import difflib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from hyperiqa_jax import config_checks, evaluate
from hyperiqa_jax import study_report as sr
from hyperiqa_jax.errors import ConfigError, UserError
from hyperiqa_jax.paths import as_epath, is_url

COMMANDS = ("plan", "run", "report")
STUDY_KEYS = ("name", "description", "rows", "seeds", "splits", "ablation", "sizes",
              "zero_shot", "cross_data")
ROW_KEYS = ("name", "config", "overrides", "about")
SETTINGS_FILE = "study.json"
RUN_FILE = "study_run.json"  # in each workdir: the run's planned train flags and attempts


def define_flags(flag_values=flags.FLAGS):
    """The command's flags (defined when it runs, see hyperiqa_jax/cli.py)."""
    flags.DEFINE_string("study", None, "Study file, e.g. configs/studies/demo.py (FILE:ARG "
                        "passes ARG to its get_study). Default: the one ROOT was planned with.",
                        flag_values=flag_values)
    flags.DEFINE_string("root", None, "Folder of the study: runs/, plan/, report/.",
                        flag_values=flag_values)
    flags.DEFINE_multi_string("data", [], "LABEL=ROOT: where a data set is (LABEL: the "
                              "training data set's name or a zero-shot label). Repeatable.",
                              flag_values=flag_values)
    flags.DEFINE_multi_string("override", [], "KEY=VALUE: a config override for every run, "
                              "e.g. train.epochs=8. Repeatable.", flag_values=flag_values)
    flags.DEFINE_list("timing_batches", ["1", "64"], "report: batch sizes of the scoring-time "
                      "measurement ('' to skip it).", flag_values=flag_values)
    flags.DEFINE_string("python", sys.executable, "Python of the train and evaluate processes "
                        "(run, report).", flag_values=flag_values)


# ---------------------------------------------------------------------------- the study


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    config: str
    overrides: tuple = ()
    about: str = ""


@dataclasses.dataclass(frozen=True)
class Study:
    spec: str  # FILE[:ARG] as given
    name: str
    description: str
    rows: tuple
    seeds: tuple
    splits: int
    ablation: tuple
    sizes: tuple
    zero_shot: dict
    cross_data: tuple

    @property
    def kind(self):
        """'splits' (median over random splits) or 'seeds' (mean +- std over seeds)."""
        return "splits" if self.splits else "seeds"

    @property
    def repeats(self):
        """(tag, seed, split flags) of each run of a row."""
        if self.splits:
            return [(f"split{i}", i, ("--config.data.train_split=random:train",
                                      "--config.data.test_split=random:test"))
                    for i in range(self.splits)]
        return [(f"seed{s}", s, ()) for s in self.seeds]

    def row(self, name):
        return next(r for r in self.rows if r.name == name)


def load_study(spec):
    """The Study of `FILE[:ARG]` (get_study(ARG)), checked: unknown keys and rows are errors."""
    path, arg = spec, None
    if not os.path.isfile(spec) and ":" in spec:
        path, _, arg = spec.rpartition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--study {spec}: no such study file (the project's studies are "
                          "configs/studies/*.py; paths are relative to the current folder)")
    module = config_checks.load_python_file(path, "study_file")
    if not hasattr(module, "get_study"):
        raise ConfigError(f"--study {path}: it defines no get_study() (see "
                          "configs/studies/demo.py)")
    raw = module.get_study(arg) if arg is not None else module.get_study()
    return check_study(raw, spec)


def _unknown(keys, known, where):
    for key in keys:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{where}: unknown key {key!r}{hint} (known: {', '.join(known)})")


def check_study(raw, spec):
    where = f"study {spec}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: get_study() must return a dict")
    _unknown(raw, STUDY_KEYS, where)
    rows = []
    for item in raw.get("rows") or ():
        _unknown(item, ROW_KEYS, f"{where}, row {item.get('name', '?')}")
        name = str(item.get("name", ""))
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"{where}: row name {name!r} must be letters, digits, '.', '_' "
                              "or '-' (it names the row's folder)")
        if not item.get("config"):
            raise ConfigError(f"{where}, row {name}: no config file")
        rows.append(Row(name, str(item["config"]), tuple(item.get("overrides") or ()),
                        str(item.get("about", ""))))
    if not rows:
        raise ConfigError(f"{where}: no rows")
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: row names repeat: {names}")
    splits = int(raw.get("splits") or 0)
    seeds = tuple(int(s) for s in raw.get("seeds") or (0,))
    if splits < 0 or (splits and raw.get("seeds")):
        raise ConfigError(f"{where}: give seeds or a positive number of splits, not both")
    for key in ("ablation", "sizes", "cross_data"):
        for name in raw.get(key) or ():
            if name not in names:
                raise ConfigError(f"{where}, {key}: no row named {name!r} (rows: "
                                  f"{', '.join(names)})")
    zero_shot = dict(raw.get("zero_shot") or {})
    for label, data in zero_shot.items():
        _check_data_name(str(data).partition(":")[0], f"{where}, zero_shot {label}")
    for override in (o for r in rows for o in r.overrides):
        override_flag(override, where)
    return Study(spec, str(raw.get("name") or Path(spec).stem), str(raw.get("description", "")),
                 tuple(rows), seeds, splits, tuple(raw.get("ablation") or ()),
                 tuple(raw.get("sizes") or ()), zero_shot, tuple(raw.get("cross_data") or ()))


def _check_data_name(name, where):
    from hyperiqa_jax.data import DATASETS

    if name not in DATASETS:
        raise ConfigError(f"{where}: unknown data set {name!r}; one of {', '.join(DATASETS)}")


def override_flag(text, where="--override"):
    """'train.epochs=8' -> '--config.train.epochs=8' (the train command's override flag)."""
    key, sep, _ = text.partition("=")
    if not sep or not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", key.strip()):
        raise ConfigError(f"{where}: override {text!r} must be KEY=VALUE, e.g. train.epochs=8")
    return f"--config.{text.strip()}"


def resolve_config(config_path, config_flags_list, where):
    """The config `train` builds from `--config=config_path` and these override flags, checked."""
    from ml_collections import config_flags

    from hyperiqa_jax.config_checks import check_config

    if not os.path.isfile(config_path):
        raise ConfigError(f"{where}: no config file {config_path} (config paths are relative "
                          f"to the current folder {os.getcwd()}: run from the repository root)")
    argv = ["train", f"--config={config_path}", *config_flags_list]
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                    sys_argv=argv)
    try:
        values(argv)
        config = values.config
    except (flags.Error, KeyError, AttributeError, ValueError, TypeError) as e:
        text = str(e.args[0] if e.args and isinstance(e.args[0], BaseException) else e)
        raise ConfigError(f"{where}: {text.strip().splitlines()[0]} (every config key is "
                          "listed in hyperiqa_jax/config_defaults.py)") from None
    try:
        check_config(config)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return config


# ---------------------------------------------------------------------------- runs


@dataclasses.dataclass(frozen=True)
class Evaluation:
    label: str      # the data set's label (in-domain: NAME:SPLIT of the training data)
    data: str       # evaluate's --data NAME[:SPLIT]=ROOT
    out: str        # evaluate's --out
    in_domain: bool


@dataclasses.dataclass(frozen=True)
class Run:
    row: str
    tag: str
    seed: int
    workdir: str
    config: str
    data_root: str
    train_flags: tuple  # what follows --config, --workdir and --config.data.root
    evaluations: tuple
    model_config: object = dataclasses.field(compare=False, repr=False)

    @property
    def name(self):
        return f"{self.row}/{self.tag}"

    def train_command(self, python="python"):
        return [python, "-m", "hyperiqa_jax.train", f"--config={self.config}",
                f"--workdir={self.workdir}", f"--config.data.root={self.data_root}",
                *self.train_flags]

    def evaluate_command(self, evaluation, python="python"):
        return [python, "-m", "hyperiqa_jax.evaluate", f"--checkpoint={self.workdir}",
                f"--data={evaluation.data}", f"--seed={self.seed}", f"--out={evaluation.out}"]

    @property
    def in_domain(self):
        return next(e for e in self.evaluations if e.in_domain)


def demo_root():
    """The demo data set's folder (generated by train or `run` when missing)."""
    from hyperiqa_jax.data.demo import default_cache_dir

    return default_cache_dir()


def plan_runs(study, root, data_roots, overrides):
    """Every run of the study, seed- (or split-) major, each config resolved and checked.

    Returns (runs, skipped): skipped lists zero-shot evaluations without a data root.
    """
    user_flags = [override_flag(o) for o in overrides]
    runs, skipped = [], []
    for tag, seed, split_flags in study.repeats:
        for row in study.rows:
            flags_ = (f"--config.seed={seed}", *split_flags,
                      *(override_flag(o) for o in row.overrides), *user_flags)
            where = f"row {row.name} ({row.config})"
            config = resolve_config(row.config, flags_, where)
            name = config.data.name
            data_root = data_roots.get(name) or config.data.root or (
                demo_root() if name == "demo" else "")
            if not data_root:
                raise ConfigError(f"{where} trains on {name}: give its folder with "
                                  f"--data {name}=ROOT")
            workdir = _join(root, "runs", row.name, tag)
            split = config.data.test_split
            label = f"{name}:{split}"
            evaluations = [Evaluation(label, f"{label}={data_root}",
                                      _join(workdir, "eval", _folder(label)), True)]
            if row.name in study.cross_data:
                for zs_label, data in study.zero_shot.items():
                    zs_root = data_roots.get(zs_label) or (
                        demo_root() if data.partition(":")[0] == "demo" else "")
                    if not zs_root:
                        skipped.append(f"{zs_label} ({data}) for {row.name}: no --data "
                                       f"{zs_label}=ROOT")
                        continue
                    evaluations.append(Evaluation(zs_label, f"{data}={zs_root}",
                                                  _join(workdir, "eval", _folder(zs_label)),
                                                  False))
            runs.append(Run(row.name, tag, seed, workdir, row.config, data_root, flags_,
                            tuple(evaluations), config.model))
    return runs, sorted(set(skipped))


def _join(*parts):
    return "/".join(p.rstrip("/") for p in parts) if is_url(parts[0]) else os.path.join(*parts)


def _folder(label):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


# ---------------------------------------------------------------------------- settings


def settings(root, spec, data_args, overrides):
    """(study spec, data roots, overrides) for ROOT: the given ones, else those ROOT keeps.

    ROOT/study.json keeps them from the first plan or run (`remember`); a later
    command may leave them out, give more data roots, but not other overrides or
    another study.
    """
    data_roots = {}
    for arg in data_args:
        label, sep, path = arg.partition("=")
        if not sep or not label.strip() or not path.strip():
            raise ConfigError(f"--data {arg!r}: expected LABEL=ROOT, e.g. koniq10k=/data/koniq10k")
        path = path.strip()
        data_roots[label.strip()] = path if is_url(path) else os.path.abspath(path)
    for o in overrides:
        override_flag(o)
    record_path = as_epath(root) / SETTINGS_FILE
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    if record:
        if spec and spec != record["study"]:
            raise UserError(f"{root} holds the study {record['study']}, not {spec}: give "
                            "another --root")
        if overrides and list(overrides) != record["overrides"]:
            raise UserError(f"{root} was planned with overrides {record['overrides'] or 'none'}, "
                            f"not {list(overrides)}: runs would mix configs; give the same "
                            "--override flags (or none), or another --root")
        spec = record["study"]
        overrides = record["overrides"]
        data_roots = {**record["data"], **data_roots}
    if not spec:
        raise app.UsageError("--study is needed the first time a --root is used")
    return spec, data_roots, list(overrides)


def remember(root, spec, data_roots, overrides):
    """Writes ROOT/study.json (see `settings`)."""
    path = as_epath(root) / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"study": spec, "overrides": list(overrides),
                                "data": data_roots}, indent=2))


# ---------------------------------------------------------------------------- plan


def write_plan(study, runs, root, overrides, skipped):
    """ROOT/plan/: commands.sh, slurm_array.sbatch, tpu_commands.sh, plan.json."""
    out = as_epath(_join(root, "plan"))
    out.mkdir(parents=True, exist_ok=True)
    as_epath(_join(root, "logs")).mkdir(exist_ok=True)  # the SLURM array's output
    about = (f"Study {study.name} ({study.spec}): {len(runs)} runs, "
             f"{len(study.rows)} rows x {len(study.repeats)} {study.kind}")
    changes = ("Overrides for every run: " + ", ".join(overrides)) if overrides else \
        "No overrides."

    lines = ["#!/usr/bin/env bash", f"# {about}.", f"# {changes}",
             "# Every run's train and evaluate commands, in order; run from the repository "
             "root.", "# `python -m hyperiqa_jax.study ... run` runs the same commands and "
             "skips finished runs.", "set -euo pipefail", ""]
    for i, run in enumerate(runs):
        lines.append(f"# [{i + 1}/{len(runs)}] {run.name}")
        lines.append(shlex.join(run.train_command()))
        lines += [shlex.join(run.evaluate_command(e)) for e in run.evaluations]
        lines.append("")
    (out / "commands.sh").write_text("\n".join(lines))
    (out / "slurm_array.sbatch").write_text(slurm_script(study, runs, root, about, changes))
    (out / "tpu_commands.sh").write_text(tpu_script(runs, about, changes))
    (out / "plan.json").write_text(json.dumps({
        "study": study.spec, "name": study.name, "overrides": list(overrides),
        "not_evaluated": skipped,
        "runs": [{"row": r.row, "tag": r.tag, "seed": r.seed, "workdir": r.workdir,
                  "train": r.train_command(),
                  "evaluate": [r.evaluate_command(e) for e in r.evaluations]} for r in runs],
    }, indent=2))
    return out


def slurm_script(study, runs, root, about, changes):
    """A job array, one task per run: train through launch/gpu_slurm.sbatch, then evaluate."""
    logs = _join(root, "logs")
    head = f"""#!/usr/bin/env bash
# {about}.
# {changes}
# One SLURM array task per run: train through launch/gpu_slurm.sbatch (its train
# command with this run's flags), then evaluate the finished run. Submit from the
# repository root (the folder that holds launch/); output goes to {logs}/:
#
#   sbatch {_join(root, "plan", "slurm_array.sbatch")}
#
# The resources below are those of one run (one GPU); options given to sbatch
# override them (e.g. --gpus-per-task=1 --ntasks-per-node=8 for 8 GPUs per run,
# --array=2,5 to rerun two runs, --array=0-{len(runs) - 1}%4 for 4 at a time).
# A requeued or rerun task resumes its run from the workdir.
#SBATCH --job-name=study-{study.name}
#SBATCH --array=0-{len(runs) - 1}
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-task=1
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --requeue
#SBATCH --output={logs}/slurm-%A_%a.out

set -euo pipefail
cd "${{SLURM_SUBMIT_DIR:-.}}"
python=${{PYTHON:-.venv/bin/python}}
# train exits 0 when SLURM stops it early (after a checkpoint): evaluate finished runs only.
finished() {{
    "$python" -c "import sys; from hyperiqa_jax.study import run_finished as f; \
sys.exit(0 if f(sys.argv[1]) else 1)" "$1"
}}

case "${{SLURM_ARRAY_TASK_ID:?submit this script with sbatch: it is a job array}}" in
"""
    cases = []
    for i, run in enumerate(runs):
        train = shlex.join(["bash", "launch/gpu_slurm.sbatch", run.config, run.workdir,
                            run.data_root, *run.train_flags])
        evaluate = [shlex.join(["srun", "--nodes=1", "--ntasks=1", *run.evaluate_command(
            e, python="PYTHON")]).replace("PYTHON", '"$python"', 1) for e in run.evaluations]
        cases.append(f"{i})  # {run.name}\n    {train}\n    if finished {shlex.quote(run.workdir)}"
                     "; then\n" + "".join(f"        {c}\n" for c in evaluate) + "    fi\n    ;;")
    tail = (f'*)\n    echo "no run $SLURM_ARRAY_TASK_ID: this study has runs 0-{len(runs) - 1}"'
            " >&2\n    exit 2\n    ;;\nesac\n")
    return head + "\n".join(cases) + "\n" + tail


def tpu_script(runs, about, changes):
    """One launch/tpu_pod.sh line per run, on a slice created once and kept (-r -k)."""
    lines = ["#!/usr/bin/env bash", f"# {about}.", f"# {changes}",
             "# One launch/tpu_pod.sh command per run, run from the repository root. Set",
             "# TPU_NAME, TPU_ZONE and TPU_TYPE; -r reuses that slice (create it first, e.g.",
             "# launch/tpu_pod.sh without -r for the first run) and -k keeps it for the next",
             "# run: delete it at the end. Workdirs and data must be gs:// paths or on every",
             "# worker (plan with --root=gs://BUCKET/...). Evaluate afterwards with",
             "# `python -m hyperiqa_jax.study ... report` (or commands.sh's evaluate lines).",
             "set -euo pipefail",
             ': "${TPU_NAME:?set TPU_NAME}" "${TPU_ZONE:?set TPU_ZONE}" '
             '"${TPU_TYPE:?set TPU_TYPE}"', ""]
    for i, run in enumerate(runs):
        args = ["-w", run.workdir, "-d", run.data_root, "-c", run.config, "-r", "-k", "--",
                *run.train_flags]
        lines += [f"# [{i + 1}/{len(runs)}] {run.name}",
                  'launch/tpu_pod.sh -n "$TPU_NAME" -z "$TPU_ZONE" -t "$TPU_TYPE" '
                  + shlex.join(args)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- run


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def run_finished(workdir):
    """Whether train finished in `workdir`: summary.json says it completed (or stopped early
    on its patience) and its step is the latest checkpoint's."""
    from hyperiqa_jax import checkpointing

    summary = _read_json(Path(workdir) / "summary.json")
    if not summary:
        return False
    done = (summary.get("step") == summary.get("total_steps")
            or str(summary.get("stop_reason", "")).startswith("early stopping"))
    try:
        _, latest = checkpointing.find_checkpoint(Path(workdir) / checkpointing.LATEST_DIR)
    except FileNotFoundError:
        return False
    return bool(done and latest == summary.get("step"))


def evaluated_checkpoint(evaluation, workdir):
    """The evaluation's result if it is of the checkpoint evaluate picks now, else None."""
    from hyperiqa_jax import checkpointing

    results = _read_json(Path(evaluation.out) / "results.json")
    if not results:
        return None
    manager_dir, step = checkpointing.find_checkpoint(workdir)
    source = Path(results[0].get("checkpoint", ""))
    return results[0] if (source.parent.name, source.name) == (manager_dir.name,
                                                              str(step)) else None


def _check_run_record(run):
    """Refuses a workdir started with other train flags (its runs would mix configs)."""
    record = _read_json(Path(run.workdir) / RUN_FILE)
    planned = [run.config, *run.train_flags]
    if record and record.get("train") != planned:
        raise UserError(f"{run.workdir} was started with {shlex.join(record.get('train') or [])}"
                        f", not {shlex.join(planned)}: give the same --override flags, or "
                        "another --root")


def _record_attempt(run, exit_status, seconds):
    path = Path(run.workdir) / RUN_FILE
    record = _read_json(path) or {"row": run.row, "tag": run.tag,
                                  "train": [run.config, *run.train_flags], "attempts": []}
    record["attempts"].append({"ended": sr.now(), "seconds": round(seconds, 1),
                               "exit_status": exit_status})
    path.write_text(json.dumps(record, indent=2))


class Interrupted(Exception):
    """SIGTERM to the study: stop the current run at a checkpoint."""


def call(argv, log_path):
    """Runs `argv` with its output appended to `log_path`; returns its exit status.

    The child runs in its own session, so Ctrl-C reaches only the study, which then
    sends it SIGTERM: train checkpoints at its next step boundary and exits.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:
        log.write(f"\n$ {shlex.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait()
        except BaseException:
            proc.terminate()
            try:
                proc.wait()
            except BaseException:  # interrupted again: do not wait for the checkpoint
                proc.kill()
                raise
            raise


def last_error(log_path):
    """The `error: ...` line of a failed command's log, else its last line."""
    try:
        lines = [x.strip() for x in Path(log_path).read_text().splitlines() if x.strip()]
    except OSError:
        return "no log"
    errors = [x for x in lines if x.startswith("error:")]
    return (errors or lines or ["no output"])[-1][:300]


def evaluate_missing(run, python, bar_write):
    """Evaluates a finished run where its results are missing or of another checkpoint.

    Returns {label: error line} of the evaluations that failed.
    """
    failed = {}
    for e in run.evaluations:
        if evaluated_checkpoint(e, run.workdir) is not None:
            continue
        log = os.path.join(run.workdir, "logs", f"evaluate_{_folder(e.label)}.log")
        bar_write(f"  {run.name}: evaluating on {e.label} (log: {log})")
        if call(run.evaluate_command(e, python), log) != 0:
            failed[e.label] = last_error(log)
            bar_write(f"  {run.name}: evaluation on {e.label} failed: {failed[e.label]}")
    return failed


def run_all(study, runs, root, python):
    """Trains and evaluates every run not yet done; returns the exit status (1: a run failed)."""
    from tqdm import tqdm

    for run in runs:
        _check_run_record(run)
    if any(r.data_root == demo_root() for r in runs):
        from hyperiqa_jax.data import ensure_demo_dataset

        ensure_demo_dataset()
    done_before = [r for r in runs if run_finished(r.workdir)]
    todo = [r for r in runs if r not in done_before
            or any(evaluated_checkpoint(e, r.workdir) is None for e in r.evaluations)]
    print(f"study {study.name}: {len(runs)} runs, {len(done_before)} trained before, "
          f"{len(todo)} to train or evaluate -> {root}", flush=True)
    t0 = time.time()
    failed = {}
    bar = tqdm(todo, desc="runs", unit="run", dynamic_ncols=True, file=sys.stderr)
    try:
        for run in bar:
            bar.set_postfix_str(run.name)
            if not run_finished(run.workdir):
                log = os.path.join(run.workdir, "logs", "train.log")
                bar.write(f"{run.name}: training -> {run.workdir} (log: {log})")
                t_run = time.time()
                status = call(run.train_command(python), log)
                _record_attempt(run, status, time.time() - t_run)
                if status != 0 or not run_finished(run.workdir):
                    failed[run.name] = (last_error(log) if status else
                                        "train stopped before the end (see its log)")
                    bar.write(f"{run.name}: FAILED ({failed[run.name]})")
                    continue
                bar.write(f"{run.name}: trained in {(time.time() - t_run) / 60:.1f} min")
            errors = evaluate_missing(run, python, bar.write)
            if errors:
                failed[run.name] = "; ".join(f"{k}: {v}" for k, v in errors.items())
                continue
            result = evaluated_checkpoint(run.in_domain, run.workdir)
            bar.write(f"{run.name}: {run.in_domain.label} SRCC {sr.fmt(result['srcc'])} "
                      f"PLCC {sr.fmt(result['plcc'])}")
    except (KeyboardInterrupt, Interrupted):
        bar.close()
        print(f"study {study.name}: interrupted; the run in progress saved a checkpoint if it "
              "had reached its training loop. Rerun the same command to resume.", flush=True)
        return 130
    bar.close()
    finished = sum(run_finished(r.workdir) for r in runs)
    print(f"study {study.name}: {finished}/{len(runs)} runs finished ({len(done_before)} "
          f"before), {len(failed)} failed, {(time.time() - t0) / 60:.1f} min"
          + "".join(f"\n  failed: {k}: {v}" for k, v in failed.items()), flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------- report


def report(study, runs, root, overrides, skipped, python, timing_batches, command):
    """Evaluates what is missing, then writes ROOT/report/ (study_report); returns its path."""
    from tqdm import tqdm

    todo = [r for r in runs if run_finished(r.workdir)
            and any(evaluated_checkpoint(e, r.workdir) is None for e in r.evaluations)]
    eval_errors = {}
    for run in tqdm(todo, desc="evaluate", unit="run", file=sys.stderr, disable=not todo):
        for label, error in evaluate_missing(run, python, tqdm.write).items():
            eval_errors[(run.name, label)] = error
    gathered = [gather_run(r, eval_errors) for r in runs]
    models = {row.name: next(r.model_config for r in runs if r.row == row.name)
              for row in study.rows}
    document, data = sr.build_report(study, gathered, models, root=root, overrides=overrides,
                                     skipped=skipped, timing_batches=timing_batches,
                                     command=command)
    return sr.write_report(os.path.join(root, "report"), document, data)


def run_status(run):
    """(status, error or None): finished, failed, stopped (e.g. preempted), started, pending."""
    workdir = Path(run.workdir)
    if run_finished(workdir):
        return "finished", None
    record = _read_json(workdir / RUN_FILE)
    if record and record["attempts"] and record["attempts"][-1]["exit_status"]:
        return "failed", last_error(workdir / "logs" / "train.log")
    summary = _read_json(workdir / "summary.json")
    if summary:
        return "stopped", f"{summary.get('stop_reason')} at step {summary.get('step')}"
    if (workdir / "checkpoints").is_dir():
        return "started", None
    return "pending", None


def gather_run(run, eval_errors):
    """What the report needs of one run, as plain values (study_report.build_report)."""
    status, error = run_status(run)
    workdir = Path(run.workdir)
    out = {"row": run.row, "tag": run.tag, "seed": run.seed, "workdir": run.workdir,
           "status": status, "error": error, "results": {}, "not_evaluated": {},
           "in_domain": run.in_domain.label}
    summary = _read_json(workdir / "summary.json") or {}
    record = _read_json(workdir / RUN_FILE) or {}
    out.update(step=summary.get("step"), total_steps=summary.get("total_steps"),
               best_srcc=summary.get("best_srcc"),
               train_seconds=(sum(a["seconds"] for a in record.get("attempts", []))
                              or summary.get("wall_seconds")))
    out["curve"] = read_curve(workdir / "metrics.jsonl")
    if status != "finished":
        return out
    for e in run.evaluations:
        result = evaluated_checkpoint(e, run.workdir)
        if result is None:
            out["not_evaluated"][e.label] = eval_errors.get((run.name, e.label), "no result")
            continue
        out["results"][e.label] = {k: result.get(k) for k in (
            "srcc", "plcc", "krcc", "rmse", "plcc_logistic", "num_images", "failed_images")}
    name, split, root = evaluate.parse_data_arg(run.in_domain.data)
    tag = evaluate.output_tag(name, split)
    attention_csv = Path(run.in_domain.out) / f"attention_{tag}.csv"
    if run.in_domain.label in out["results"] and attention_csv.exists():
        paths, names, values = sr.read_stage_attention(attention_csv)
        out["attention"] = sr.attention_groups(
            values, paths, names, distortions=sr.distortion_labels(name, root),
            mos=read_mos(Path(run.in_domain.out) / f"predictions_{tag}.csv"))
    return out


def read_curve(path):
    """{'loss': [(epoch, loss)], 'test': [(epoch, SRCC)]} of a metrics.jsonl."""
    curve = {"loss": [], "test": []}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return curve
    for line in lines:
        row = json.loads(line) if line.strip() else {}
        if row.get("split") == "train" and row.get("loss") is not None:
            curve["loss"].append((row["epoch"], row["loss"]))
        elif row.get("split") == "test" and row.get("srcc") is not None:
            curve["test"].append((row["epoch"], row["srcc"]))
    return curve


def read_mos(path):
    """{image path: MOS} of evaluate's predictions file."""
    import csv

    with open(path, newline="") as f:
        return {row["path"]: float(row["mos"]) for row in csv.DictReader(f)}


# ---------------------------------------------------------------------------- the command


def main(argv, flag_values=flags.FLAGS):
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise app.UsageError(f"give one command, {', '.join(COMMANDS)}, e.g. "
                             "--study=configs/studies/demo.py --root=runs/study-demo plan")
    command = argv[1]
    if not flag_values.root:
        raise app.UsageError("--root is needed: the study's folder (runs, plan, report)")
    root = flag_values.root if is_url(flag_values.root) else os.path.abspath(flag_values.root)
    if is_url(root) and command != "plan":
        raise UserError(f"--root {root}: {command} needs a local folder (or a mounted bucket); "
                        "plan takes gs:// roots")
    try:
        timing = [int(b) for b in flag_values.timing_batches if b.strip()]
    except ValueError:
        raise ConfigError(f"--timing_batches={','.join(flag_values.timing_batches)}: give "
                          "positive integers, e.g. 1,64") from None
    if any(b < 1 for b in timing):
        raise ConfigError("--timing_batches: batch sizes must be at least 1")
    spec, data_roots, overrides = settings(root, flag_values.study, flag_values.data,
                                           flag_values.override)
    study = load_study(spec)
    runs, skipped = plan_runs(study, root, data_roots, overrides)
    if command != "report":
        remember(root, spec, data_roots, overrides)
    plan_dir = write_plan(study, runs, root, overrides, skipped)
    if command == "plan":
        evaluations = sum(len(r.evaluations) for r in runs)
        print(f"plan: study {study.name}, {len(runs)} runs ({len(study.rows)} rows x "
              f"{len(study.repeats)} {study.kind}), {len(runs)} train + {evaluations} evaluate "
              f"commands -> {plan_dir}: commands.sh, slurm_array.sbatch (array "
              f"0-{len(runs) - 1}), tpu_commands.sh, plan.json"
              + "".join(f"\n  not evaluated: {line}" for line in skipped))
        return 0
    if command == "run":
        def stop(signum, frame):
            raise Interrupted()

        previous = signal.signal(signal.SIGTERM, stop)
        try:
            return run_all(study, runs, root, flag_values.python)
        finally:
            signal.signal(signal.SIGTERM, previous)
    line = shlex.join(["python", "-m", "hyperiqa_jax.study", f"--study={spec}",
                       f"--root={flag_values.root}", "report"])
    out = report(study, runs, root, overrides, skipped, flag_values.python, timing, line)
    finished = sum(run_finished(r.workdir) for r in runs)
    print(f"report: study {study.name}, {finished}/{len(runs)} runs finished -> "
          f"{out}/report.md, report.html, report.json")
    return 0


if __name__ == "__main__":
    from hyperiqa_jax import cli

    cli.run(main, define_flags=define_flags)

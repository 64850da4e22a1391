"""The error boundary every command-line entry point shares.

An expected mistake (a bad config value or override, a missing or wrong path, a
data set or label file that is not as described in docs/data.md, a checkpoint
that cannot be read, too many corrupt images) is raised as a `UserError`: the
boundary prints it as `error: ...` (what is wrong and what to do) and exits
with status 2. Anything else is a bug and keeps its traceback.

    if __name__ == "__main__":      # every command is an absl program
        cli.run(main, define_flags=define_flags)

    cli.call(main, ["--flag=value"], define_flags=define_flags)  # the same, in this process

A command's `define_flags(flag_values=flags.FLAGS)` defines its flags and its
`main(argv, flag_values=flags.FLAGS)` reads them from `flag_values`: `run`
(the command line) uses absl's global FLAGS, `call` (tests, Python callers)
a fresh FlagValues per call, so commands whose flags share names (--model,
--checkpoint) can run one after another in one process. Commands with an
ml_collections config flag (train, demo, convert_checkpoint), whose
--config.KEY=VALUE overrides are read from sys.argv, and predict and evaluate
define their flags in absl's FLAGS and run through `run` only.

The errors themselves are in `errors.py` (`UserError` and its subclasses).
Path errors of the OS (a file that is missing, in the way, or not readable)
count as user errors too, and so does a missing module of an optional extra
(torch, timm: weight conversion and parity only).
"""

import contextlib
import functools
import os
import re
import sys

from hyperiqa_jax.errors import ConfigError, UserError

EXIT_USER_ERROR = 2

# OS errors about a path the user gave.
PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)

# Modules of the optional extras (pyproject.toml), which `make demo` does not install.
EXTRAS = {"torch": "torch", "torchvision": "torch", "timm": "torch", "safetensors": "torch"}


def message(error):
    """The one-line text of a user error."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"  # rather than "[Errno 2] No such ..."
    return str(error) or type(error).__name__


def report(error):
    """Prints `error: ...` to stderr; returns the exit status for it."""
    print(f"error: {message(error)}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def guarded(main, expected=()):
    """`main` wrapped so that a user error (or one of `expected`) is reported, not raised.

    The wrapper returns main's result, or EXIT_USER_ERROR after printing the error.
    """
    user_errors = (UserError, *PATH_ERRORS, *expected)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except user_errors as error:
            return report(error)
        except ModuleNotFoundError as error:
            extra = EXTRAS.get((error.name or "").partition(".")[0])
            if extra is None:
                raise
            return report(UserError(
                f"{error.name} is not installed: this command needs the '{extra}' extra "
                f"(.venv/bin/pip install -e '.[{extra}]', or `make test`, which installs it)"))

    return wrapper


def run(main, *, define_flags=None, expected=()):
    """absl's `app.run(main)` inside the boundary, flag definition and parsing included;
    library logs at WARNING unless -v / --verbosity is given.

    `main(argv)` may return an exit status (None is 0). absl's UsageError (a missing
    or unexpected argument) is a user error as well. `define_flags()`, if given, is
    called first: a config-dict flag applies its `--config.KEY=VALUE` overrides when
    it is defined.
    """
    from absl import app

    if define_flags is not None:
        with _flag_errors(sys.argv):
            define_flags()

    def entry(argv):
        from hyperiqa_jax.logs import quiet_library_logs

        quiet_library_logs()  # library INFO lines (JAX's backends, Orbax) only with -v
        try:
            status = guarded(main, expected)(argv)
        except app.UsageError as error:
            status = report(UserError(f"{error} (see --help)"))
        sys.exit(status)

    app.run(entry, flags_parser=parse_flags)


def parse(define_flags, argv=()):
    """(flag_values, remaining arguments): a fresh FlagValues holding `define_flags`'s flags,
    parsed from `argv` (the arguments after the program name).

    A flag error (unknown flag, a value of the wrong type) raises absl's flags.Error.
    """
    from absl import flags

    flag_values = flags.FlagValues()
    define_flags(flag_values)
    remaining = flag_values(["command", *argv])
    return flag_values, remaining


def call(main, argv=(), *, define_flags, expected=()):
    """Runs the command `main` in this process as `run` would from a shell; returns its exit
    status instead of exiting.

    `argv` excludes the program name; `main(argv, flag_values)` gets a FlagValues of its
    own (see the module docstring). Flag and usage errors are reported as `run` reports them.
    """
    from absl import app, flags

    from hyperiqa_jax.logs import quiet_library_logs

    try:
        flag_values, remaining = parse(define_flags, argv)
    except flags.Error as error:
        return report(UserError(f"{error} (see --help)"))
    quiet_library_logs()
    try:
        status = guarded(main, expected)(remaining, flag_values)
    except app.UsageError as error:
        status = report(UserError(f"{error} (see --help)"))
    return status or 0


def parse_flags(argv):
    """absl flag parsing for `app.run`: a bad flag or config override is one error line."""
    from absl import flags

    with _flag_errors(argv):
        remaining = flags.FLAGS(argv)
    for name in flags.FLAGS:
        problem = _config_file_problem(flags.FLAGS[name])
        if problem:
            sys.exit(report(ConfigError(problem)))
    return remaining


@contextlib.contextmanager
def _flag_errors(argv):
    """Exits with one error line for what a mistyped command line raises while parsed."""
    from absl import flags

    try:
        yield
    except flags.Error as error:  # unknown flag, a value of the wrong type, ...
        sys.exit(report(UserError(f"{error} (see --help)")))
    except (AttributeError, KeyError) as error:  # ml_collections: no such config key
        sys.exit(report(ConfigError(_unknown_key(error, argv))))
    except SyntaxError as error:  # a config file that is not Python
        sys.exit(report(ConfigError(
            f"{error.filename}, line {error.lineno}: {error.msg} (a config file is a Python "
            "file whose get_config() returns an ml_collections.ConfigDict, as configs/*.py)")))


def _unknown_key(error, argv):
    """'--config.train.batchsize=4: no config key 'batchsize'; did you mean ...' from
    ml_collections' nested KeyError / AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    key = lines[0].strip("'\"") if lines else "?"
    hint = f"; {lines[1][0].lower()}{lines[1][1:]}" if len(lines) > 1 else ""
    if "get_config" in text:
        return (f"the config file has no get_config() ({text}); a config file defines "
                "get_config() returning an ml_collections.ConfigDict, as configs/*.py do")
    # The command-line argument that names the key, to show it as typed.
    pattern = re.compile(r"^--?[A-Za-z_]\w*(\.\w+)*\." + re.escape(key) + r"(\.|=|$)")
    shown = next((a for a in argv[1:] if pattern.match(a)), None)
    where = f"{shown}: " if shown else ""
    return (f"{where}no config key '{key}'{hint} (every key is listed in "
            "hyperiqa_jax/config_defaults.py)")


def _config_file_problem(flag):
    """Why a config-file flag's file could not be loaded, or None.

    ml_collections defers that error to the first use of the config; here it is
    reported before anything starts.
    """
    from ml_collections import config_flags

    try:
        path = config_flags.get_config_filename(flag)
    except (TypeError, AttributeError):  # not a config-file flag
        return None
    if flag.value is None:
        return None
    try:
        flag.value.keys  # noqa: B018  (a config that failed to load raises on any access)
    except OSError as error:
        if not os.path.isfile(path):
            return (f"--{flag.name}={path}: no such config file (paths are relative to the "
                    f"current folder {os.getcwd()}; the project's configs are configs/*.py, "
                    "e.g. --config=configs/demo.py)")
        cause = error.__cause__ or error
        return f"--{flag.name}={path}: could not load it ({str(cause).splitlines()[0]})"
    return None

"""Refuses paths that a TPU pod's workers will not have (launch/tpu_pod.sh runs this first).

    python launch/remote_paths.py CONFIG WORKDIR DATA [train flags ...]

The workers get the checkout's files and nothing else from this machine, so the
workdir, the data root and the pretrained backbone must be gs:// paths. Checked:
--workdir, --config.data.root and --config.pretrained_backbone as `train` will see
them (the last one given among the train flags wins, as in absl), the backbone
defaulting to the config file's own value. Prints one `error: ...` line per local
path and exits 2; exits 0 when every path is on gs:// (or empty: no backbone).
Standard library only; the config file is read when ml_collections is importable
(else only the flags are checked, with a note).
"""

import importlib.util
import os
import sys

HINTS = {
    "--workdir": "a gs://BUCKET/... folder (checkpoints and logs must outlive the slice)",
    "--config.data.root": "copy the data set to a bucket (gcloud storage cp -r DIR gs://BUCKET/)",
    "--config.pretrained_backbone": "copy the converted weights to a bucket "
                                    "(gcloud storage cp -r weights/NAME gs://BUCKET/weights/)",
}


def flag_value(flags, name):
    """The last value of --name=VALUE or --name VALUE among `flags`, or None."""
    value = None
    for i, arg in enumerate(flags):
        if arg.startswith(name + "="):
            value = arg[len(name) + 1:]
        elif arg == name and i + 1 < len(flags):
            value = flags[i + 1]
    return value


def config_backbone(config):
    """The config file's pretrained_backbone, or None when it cannot be read here."""
    if importlib.util.find_spec("ml_collections") is None:
        print(f"note: ml_collections is not installed here, so {config}'s own "
              "pretrained_backbone was not checked", file=sys.stderr)
        return None
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("launch_config", config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config().get("pretrained_backbone", "")


def local_paths(config, workdir, data, flags):
    """[(flag, value)] of the paths `train` would get that are not gs:// URLs."""
    values = {"--workdir": flag_value(flags, "--workdir") or workdir,
              "--config.data.root": flag_value(flags, "--config.data.root") or data,
              "--config.pretrained_backbone": flag_value(flags, "--config.pretrained_backbone")}
    if values["--config.pretrained_backbone"] is None:
        values["--config.pretrained_backbone"] = config_backbone(config)
    return [(name, value) for name, value in values.items()
            if value and not value.startswith("gs://")]


def main(argv):
    if len(argv) < 4:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    config, workdir, data, *flags = argv[1:]
    bad = local_paths(config, workdir, data, flags)
    for name, value in bad:
        print(f"error: {name}={value} is not on gs://: the TPU workers cannot read this "
              f"machine's files; {HINTS[name]} (or pass -m if it is mounted at the same "
              "path on every worker)", file=sys.stderr)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

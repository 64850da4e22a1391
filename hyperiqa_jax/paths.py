"""Paths that may be local or URLs (gs://bucket/...), read the same way everywhere.

Local paths go through `os` and `open` (fast: a data set checks tens of
thousands of files); URLs through etils.epath, as Orbax and grain read them
(gs:// needs gcsfs, or TensorFlow's gfile where TensorFlow is installed).
"""

import os
import posixpath

from etils import epath


def is_url(path) -> bool:
    """True for gs://... and other URLs (read through etils.epath), False for local paths."""
    return "://" in os.fspath(path)


def read_bytes(path) -> bytes:
    """The contents of a local file or of a URL."""
    if is_url(path):
        return epath.Path(path).read_bytes()
    with open(path, "rb") as f:
        return f.read()


def join(base: str, *parts: str) -> str:
    """os.path.join for local paths; '/'-joined for URLs on every OS."""
    return (posixpath if is_url(base) else os.path).join(base, *parts)


def path_in(folder: str, name: str) -> str:
    """Absolute path of `name` (relative, absolute or a URL) inside `folder`."""
    if is_url(name):
        return name
    return join(folder, name) if is_url(folder) else os.path.abspath(os.path.join(folder, name))


def parent(path: str) -> str:
    """The folder holding `path` (absolute when local)."""
    return posixpath.dirname(path) if is_url(path) else os.path.dirname(os.path.abspath(path))


def isfile(path: str) -> bool:
    return epath.Path(path).is_file() if is_url(path) else os.path.isfile(path)


def isdir(path: str) -> bool:
    return epath.Path(path).is_dir() if is_url(path) else os.path.isdir(path)


def exists(path: str) -> bool:
    return epath.Path(path).exists() if is_url(path) else os.path.exists(path)


def as_epath(path) -> epath.Path:
    """An etils path: local paths made absolute, URLs kept (workdirs, checkpoints)."""
    return epath.Path(path if is_url(path) else os.path.abspath(path))

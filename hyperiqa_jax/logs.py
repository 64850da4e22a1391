"""Console logging of the command-line programs."""

import sys

from absl import logging


def quiet_library_logs():
    """Orbax logs every save and restore at INFO: show warnings only, unless -v/--verbosity."""
    if not any(a.startswith(("--verbosity", "-v")) for a in sys.argv[1:]):
        logging.set_verbosity(logging.WARNING)

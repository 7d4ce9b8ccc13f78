"""Where tshark is when PATH has none: pyshark's locator, asked only then.

PATH stays first (what the user set up wins, and costs nothing). When it has no tshark, pyshark's
`get_process_path` knows the places installers put it and users configure: the `[tshark] tshark_path` of its
config.ini (in the current directory, else pyshark's own package), `%ProgramFiles%\\Wireshark` and
`%ProgramFiles(x86)%\\Wireshark` on Windows, /Applications/Wireshark.app on macOS (the app bundle does not put
tshark on PATH), and /usr/bin, /usr/sbin, /usr/lib/tshark, /usr/local/bin when PATH is unset.

Only the locating comes from pyshark. Its version probe (`get_tshark_version`) is not used: it locates the binary
again by the name "tshark" (so `--tshark /opt/ws/tshark-4.2` would report the version of another binary, or none),
has no timeout and raises CalledProcessError; dissect.py's probe reads the same first line, bounded in time and
cached per binary. pyshark's packet objects are not used either: the hot path reads tshark's field output directly
(pyshark's objects are 4-40x slower per packet).
"""

from __future__ import annotations

import configparser
import os
import shutil
import sys

# pyshark reads its config.ini from the current directory; one there without a [tshark] section makes it raise
# configparser errors rather than look further: treated as "not found there".
_PYSHARK_FAILURES = (configparser.Error, OSError, ValueError)


def locate_tshark() -> str | None:
    """The tshark to run when none is named: PATH first, then pyshark's places; None when there is none."""
    found = shutil.which("tshark")
    if found is not None:
        return found
    return _pyshark_path()


def _pyshark_path() -> str | None:
    try:
        # Imported here, not at the top: importing pyshark loads its capture classes and asyncio (~0.12 s), which
        # only the runs that get this far should pay.
        from pyshark.tshark.tshark import TSharkNotFoundException, get_process_path
    except ImportError:  # a build without pyshark: PATH was the only place
        return None
    try:
        path = str(get_process_path())
    except (TSharkNotFoundException, *_PYSHARK_FAILURES):
        return None
    if sys.platform.startswith("win"):
        path = os.path.normpath(path)  # pyshark hands Windows paths back with forward slashes
    # An empty PATH entry makes pyshark try "tshark" relative to the current directory: only absolute paths to
    # executable files count, so a stray file named tshark where the user stands is never run.
    if not os.path.isabs(path) or not os.path.isfile(path) or not os.access(path, os.X_OK):
        return None
    return path

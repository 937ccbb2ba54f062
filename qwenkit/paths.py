"""Where qwenkit keeps what it fetches or builds: one root, `$QWENKIT_HOME` (default
~/.cache/qwenkit), with a folder per kind of thing under it: models/, kernels/, bench/, data/, evaldata/."""

from __future__ import annotations

import os
from pathlib import Path


def qwenkit_home() -> Path:
    """$QWENKIT_HOME when set and not empty, else ~/.cache/qwenkit."""
    return Path(os.environ.get("QWENKIT_HOME") or "~/.cache/qwenkit").expanduser()


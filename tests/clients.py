"""Where `.ci/clients.sh` installed the coding clients: `$GPTOSS_CLIENTS`, else `.ci/clients/`.

A client that is not there skips its test, naming why: the registry refused it at install (the
script recorded that), or the script has not run here. Under CI (`CI=true`) a client missing for
any other reason fails the test instead, so a broken install cannot pass as a skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def clients_dir() -> Path:
    return Path(os.environ.get("GPTOSS_CLIENTS") or REPO / ".ci" / "clients")


def installed(name: str, binary: str) -> Path:
    """The installed client's executable (`binary`, relative to its folder), or skip/fail."""
    path = clients_dir() / name / binary
    if path.is_file() and os.access(path, os.X_OK):
        return path
    refused = clients_dir() / "refused"
    reasons = [line for line in (refused.read_text().splitlines() if refused.is_file() else [])
               if line.startswith(f"{name}:")]
    if reasons:
        pytest.skip(reasons[0])
    message = f"{name} is not installed at {path}: run `bash .ci/clients.sh`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)

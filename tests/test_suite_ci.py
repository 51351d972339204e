"""The suite itself: a missing prerequisite skips with its reason, and in CI every skip fails.

Runs pytest in a child process on a few real tests, with `$GPTOSS_SHARED` pointing to an empty
folder (as on a checkout without ../shared) and `$CI` set or not.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_TESTS = ["tests/test_config.py", "-k", "released_hf or reads_the_same or round_trip"]


def run_pytest(args: list[str], ci: str, shared: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    environ.update(CI=ci, GPTOSS_SHARED=str(shared), **env)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rsf", "-p", "no:cacheprovider",
                           *args], cwd=REPO, env=environ, capture_output=True, text=True,
                          timeout=300)


def test_missing_shared_folder_fails_in_ci(tmp_path: Path) -> None:
    result = run_pytest(SHARED_TESTS, "true", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    last = out.splitlines()[-1]
    assert "4 errors" in last and "passed" not in last and "skipped" not in last, out
    assert out.count("skipped in CI, which must run every test: needs the shared/ folder with "
                     f"docs/gpt-oss-reference.md: not at $GPTOSS_SHARED={tmp_path}") >= 4, out


def test_missing_shared_folder_skips_with_its_reason_outside_ci(tmp_path: Path) -> None:
    result = run_pytest(SHARED_TESTS, "", tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    last = out.splitlines()[-1]
    assert "4 skipped" in last and "passed" not in last, out
    assert f"needs the shared/ folder with docs/gpt-oss-reference.md: not at $GPTOSS_SHARED=" \
           f"{tmp_path}" in out, out


def test_a_module_skipped_at_import_fails_in_ci(tmp_path: Path) -> None:
    """`pytest.importorskip` of a missing API at module level is a failure in CI, not a skip."""
    test = tmp_path / "test_needs_api.py"
    test.write_text('import pytest\n\npytest.importorskip("gptoss_no_such_module")\n\n\n'
                    'def test_x():\n    pass\n')
    # the suite's conftest as a plugin, for a test file outside tests/
    plugin = ["-p", "conftest", "--rootdir", str(tmp_path), str(test)]
    env = {"PYTHONPATH": str(REPO / "tests")}
    result = run_pytest(plugin, "true", tmp_path, **env)
    out = result.stdout + result.stderr
    assert result.returncode != 0 and "skipped in CI" in out, out
    assert "gptoss_no_such_module" in out, out
    result = run_pytest(plugin, "", tmp_path, **env)
    out = result.stdout + result.stderr
    assert result.returncode == 5 and "1 skipped" in out, out  # 5: no test ran


@pytest.mark.parametrize("value,ci", [("true", True), ("1", True), ("yes", True), ("", False),
                                      ("false", False), ("0", False), ("False", False)])
def test_what_counts_as_ci(monkeypatch: pytest.MonkeyPatch, value: str, ci: bool) -> None:
    from conftest import in_ci

    monkeypatch.setenv("CI", value)
    assert in_ci() is ci

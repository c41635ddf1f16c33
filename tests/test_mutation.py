"""The mutation check (scripts/mutation.py) in the default run: every anchor is still found, and two
planted bugs are caught. `make mutation` runs the whole list."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "mutation.py"


def mutation(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout
    )


def test_every_mutant_anchor_is_found() -> None:
    # A refactor that moves the code must move the mutant too; a lost anchor fails here, not silently.
    result = mutation("--anchors")
    assert result.returncode == 0, result.stderr
    listed = mutation("--list").stdout.splitlines()
    assert len(listed) >= 10
    assert result.stdout.count("anchor ok") == len(listed), result.stdout


def _script_module():
    spec = importlib.util.spec_from_file_location("mutation_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_a_lost_anchor_is_an_error_not_a_skip(tmp_path: Path) -> None:
    script = _script_module()
    mutant = next(m for m in script.MUTANTS if m.name == "stride_correction")
    (tmp_path / "passes").mkdir()
    (tmp_path / "passes" / "gradient_filter.py").write_text("stride_div = 1.0  # the anchor's expression moved away\n")
    with pytest.raises(script.MutationError, match="stride_correction: anchor .* not found"):
        script.locate(tmp_path, mutant)


def test_a_selection_that_runs_no_test_is_an_error() -> None:
    result = mutation("--only", "relu_mask", "--tests", "tests/test_activation_mask.py -k no_such_test")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "mutation: error: relu_mask: pytest exit status 5" in result.stderr


def test_quick_mutants_are_killed() -> None:
    result = mutation("--quick")
    assert result.returncode == 0, (result.stdout, result.stderr)
    assert "mutation score: 2/2 killed (100%)" in result.stdout

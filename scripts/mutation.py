"""Mutation check of the core passes: plant known bugs in a copy of the repository, run the tests meant
to catch each one, and fail if any bug survives.

Usage (from the repository root):

    .venv/bin/python scripts/mutation.py            # every mutant; exit 1 if one survives
    .venv/bin/python scripts/mutation.py --quick    # two cheap mutants (the default test run uses this)
    .venv/bin/python scripts/mutation.py --only stride_correction,relu_mask
    .venv/bin/python scripts/mutation.py --anchors  # only check that every mutant's anchor is found
    .venv/bin/python scripts/mutation.py --rev HEAD # mutate the committed tree instead of the working tree

Each mutant is a regex over the source files named by a glob, not a line number or a diff, so it
survives code moving between modules; it must match at least once (or exactly `count` times) or the
script stops with an error: a mutant whose anchor is gone is a broken check, never a skipped one.
The working tree is never touched: the files are copied to a temporary directory (tracked and
untracked-but-not-ignored files, or `git archive` of --rev), and pytest runs there with that
directory first on sys.path.

A mutant is killed when its tests fail (pytest exit status 1). Status 0 means it survived; any other
status (no tests collected, usage error, a crash of pytest itself) is an error of the check. With
--baseline the same selections first run unmutated and must pass, so a kill is not an old failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Fast, targeted selections from the default (non-slow) test run.
E2E_FAST = ("tests/test_filter_e2e.py", "-k", "test_filtered_step_matches_torch_reference and not full_matrix")
GF_PASS = ("tests/test_gradient_filter_pass.py", "-k", "conv_forms or special_forms")
ROW_EXACT = (
    "tests/test_properties.py",
    "tests/test_row_tiling.py",
    "-k",
    "test_row_tiling_matches_untiled_or_refuses or test_tiled_forward_is_exact",
)
GF_PROPERTY = ("tests/test_properties.py", "-k", "test_gradient_filter_matches_reference_or_refuses")
RELU_MASKS = ("tests/test_activation_mask.py",)
MOMENTUM = ("tests/test_runtime.py", "-k", "test_sgd_momentum_matches_pytorch")


@dataclass(frozen=True)
class Mutant:
    """One planted bug: `pattern` (a regex) replaced by `replacement` in the files matched by `files`."""

    name: str
    bug: str
    files: str  # glob relative to the repository root
    pattern: str
    replacement: str
    tests: tuple[str, ...]  # pytest arguments
    count: int | None = None  # exact number of matches required; None: at least one


MUTANTS: tuple[Mutant, ...] = (
    Mutant(
        "stride_correction",
        "drop the 1/(s_h*s_w) factor of strided filtered convs",
        "passes/**/*.py",
        r"float\(\s*(\w+)\.strides\[0\]\s*\*\s*\1\.strides\[1\]\s*\)",
        "1.0",
        GF_PASS,
    ),
    Mutant(
        "planner_ignores_patch_size",
        "the planner uses r = 2 whatever --patch-size says",
        "gfcompile/planning.py",
        r"\bconfig\.patch_size\b(?!_)",
        "2",
        E2E_FAST,
    ),
    Mutant(
        "short_halo",
        "row tiling reads one halo row short",
        "passes/**/*.py",
        r"\(stop - 1\) \* self\.stride - self\.pad_top \+ self\.extent\b",
        r"\g<0> - 1",
        ROW_EXACT,
        count=1,
    ),
    Mutant(
        "relu_mask",
        "ReluGrad replaced by Where(mask, dY, dY): the ReLU mask is skipped",
        "passes/**/*.py",
        r"inputs=\[mask, grad_output, zero\]",
        "inputs=[mask, grad_output, grad_output]",
        RELU_MASKS,
        count=1,
    ),
    Mutant(
        "relu6_mask",
        "Clip's (ReLU6) mask is skipped: Where(mask, dY, dY)",
        "passes/**/*.py",
        r"inputs=\[mask, grad, zero\]",
        "inputs=[mask, grad, grad]",
        RELU_MASKS,
        count=1,
    ),
    Mutant(
        "momentum_5_percent",
        "SGD momentum 5% too large",
        "runtime/**/*.py",
        r"\bself\.momentum \* velocity\b",
        "1.05 * self.momentum * velocity",
        MOMENTUM,
        count=1,
    ),
    Mutant(
        "weight_gradient_4x",
        "the filtered weight gradient is 4x too large (the size of the stride bug at s=2)",
        "passes/**/*.py",
        r"\balpha = (to_sum \* to_mean / stride_div)",
        r"alpha = 4.0 * \1",
        GF_PASS,
        count=1,
    ),
    Mutant(
        "pooling_window",
        "the mean-pool windows of the output gradient are one row/column too wide",
        "passes/**/*.py",
        r"\(index < starts \+ r\)",
        "(index <= starts + r)",
        GF_PASS,
        count=1,
    ),
    Mutant(
        "bias_gradient_dropped",
        "the filtered bias gradient is zero",
        "passes/**/*.py",
        r"\bbias_weights\.reshape\(",
        "(0.0 * bias_weights).reshape(",
        GF_PASS,
        count=1,
    ),
    Mutant(
        "upsample_crop",
        "the input-gradient upsample is cropped one row off",
        "passes/**/*.py",
        r"\(i \+ top\) // R_h",
        "(i + top + 1) // R_h",
        GF_PASS,
        count=1,
    ),
    Mutant(
        "filter_refuses_everything",
        "the gradient filter refuses every conv, with one of its documented messages",
        "passes/**/*.py",
        r"\bif min\(layer\.pads\) < 0:",
        "if True:",
        GF_PROPERTY,
        count=1,
    ),
    Mutant(
        "row_tiling_tiles_nothing",
        "the row-tiling pass selects no chain, so tiled artifacts run untiled",
        "passes/**/*.py",
        r"\bchains = select_chains\(graph, plan, bands, plan\.row_strategy\)",
        "chains = []",
        ROW_EXACT,
        count=1,
    ),
)

QUICK = ("stride_correction", "relu_mask")


class MutationError(Exception):
    """The check itself is broken (anchor gone, no tests collected, pytest crashed)."""


def copy_tree(destination: Path, rev: str | None) -> None:
    """The repository's source files (no .venv, no ignored build output) into `destination`."""
    if rev is not None:
        archive = subprocess.run(["git", "archive", "--format=tar", rev], cwd=ROOT, capture_output=True)
        if archive.returncode != 0:
            raise MutationError(f"git archive {rev}: {archive.stderr.decode().strip()}")
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(destination, filter="data")
        return
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True
    )
    if listing.returncode != 0:
        raise MutationError(f"cannot list the repository's files: {listing.stderr.decode().strip()}")
    listed = listing.stdout.split(b"\0")
    for raw in filter(None, listed):
        relative = raw.decode()
        source = ROOT / relative
        if not source.is_file():  # deleted in the working tree but still in the index
            continue
        target = destination / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)


def locate(tree: Path, mutant: Mutant) -> dict[Path, int]:
    """Files of `tree` where the mutant's anchor matches, with the number of matches; loud if none."""
    regex = re.compile(mutant.pattern)
    hits = {}
    for path in sorted(tree.glob(mutant.files)):
        found = len(regex.findall(path.read_text()))
        if found:
            hits[path] = found
    total = sum(hits.values())
    if total == 0:
        raise MutationError(f"{mutant.name}: anchor /{mutant.pattern}/ not found in {mutant.files}; update the mutant")
    if mutant.count is not None and total != mutant.count:
        where = ", ".join(f"{p.relative_to(tree)} ({n})" for p, n in hits.items())
        raise MutationError(
            f"{mutant.name}: anchor /{mutant.pattern}/ matched {total} times, expected {mutant.count}: {where}"
        )
    return hits


def run_tests(tree: Path, tests: tuple[str, ...], stop_first: bool, timeout: float) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", *tests]
    if stop_first:
        command.insert(3, "-x")
    try:
        result = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise MutationError(f"tests {' '.join(tests)} ran past {timeout:.0f} s") from exc
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return result.returncode, (lines[-1] if lines else result.stderr.strip()[-300:])


def check_imports_from(tree: Path) -> None:
    """The copy's packages, not the editable install of the working tree, must be the ones tested."""
    probe = "import gfcompile, passes, runtime; print(gfcompile.__file__, passes.__file__, runtime.__file__)"
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=env, capture_output=True, text=True, check=True)
    if any(not Path(path).resolve().is_relative_to(tree.resolve()) for path in out.stdout.split()):
        raise MutationError(f"the copy imports packages from outside it: {out.stdout.strip()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    parser.add_argument("--only", help="comma-separated mutant names")
    parser.add_argument("--anchors", action="store_true", help="check the anchors, run no tests")
    parser.add_argument("--baseline", action="store_true", help="run each selection unmutated first")
    parser.add_argument("--rev", help="mutate this git revision instead of the working tree")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per pytest run")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--tests", help="pytest arguments that replace every chosen mutant's own selection")
    args = parser.parse_args(argv)

    by_name = {mutant.name: mutant for mutant in MUTANTS}
    names = list(QUICK) if args.quick else (args.only.split(",") if args.only else list(by_name))
    unknown = [name for name in names if name not in by_name]
    if unknown:
        parser.error(f"unknown mutants {unknown}; known: {', '.join(by_name)}")
    chosen = [by_name[name] for name in names]
    if args.tests:
        chosen = [dataclasses.replace(mutant, tests=tuple(shlex.split(args.tests))) for mutant in chosen]
    if args.list:
        for mutant in chosen:
            print(f"{mutant.name:28} {mutant.bug}  [{' '.join(mutant.tests)}]")
        return 0

    with tempfile.TemporaryDirectory(prefix="gfcompile-mutation-") as scratch:
        tree = Path(scratch) / "repo"
        tree.mkdir()
        try:
            copy_tree(tree, args.rev)
            anchors = {mutant.name: locate(tree, mutant) for mutant in chosen}
            if args.anchors:
                for mutant in chosen:
                    where = ", ".join(f"{p.relative_to(tree)} ({n})" for p, n in anchors[mutant.name].items())
                    print(f"anchor ok  {mutant.name:28} {where}")
                return 0
            check_imports_from(tree)
            if args.baseline:
                for tests in dict.fromkeys(mutant.tests for mutant in chosen):
                    status, summary = run_tests(tree, tests, stop_first=False, timeout=args.timeout)
                    if status != 0:
                        raise MutationError(f"unmutated tests fail ({' '.join(tests)}): {summary}")
                    print(f"baseline ok  {' '.join(tests)}: {summary}", flush=True)
            survivors = []
            for mutant in chosen:
                originals = {path: path.read_text() for path in anchors[mutant.name]}
                for path, text in originals.items():
                    mutated = re.sub(mutant.pattern, mutant.replacement, text)
                    if mutated == text:
                        raise MutationError(f"{mutant.name}: the replacement leaves {path.relative_to(tree)} unchanged")
                    path.write_text(mutated)
                started = time.monotonic()
                try:
                    status, summary = run_tests(tree, mutant.tests, stop_first=True, timeout=args.timeout)
                finally:
                    for path, text in originals.items():
                        path.write_text(text)
                seconds = time.monotonic() - started
                if status == 1:
                    verdict = "killed"
                elif status == 0:
                    verdict = "SURVIVED"
                    survivors.append(mutant.name)
                else:
                    raise MutationError(f"{mutant.name}: pytest exit status {status} ({summary})")
                print(f"{verdict:8}  {mutant.name:28} {seconds:6.1f} s  {summary}", flush=True)
        except MutationError as exc:
            print(f"mutation: error: {exc}", file=sys.stderr)
            return 2
    killed = len(chosen) - len(survivors)
    print(f"mutation score: {killed}/{len(chosen)} killed ({100 * killed / len(chosen):.0f}%)")
    if survivors:
        print(f"surviving mutants: {', '.join(survivors)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

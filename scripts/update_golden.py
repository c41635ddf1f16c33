"""Rewrite the golden snapshots in tests/golden/ from fresh compiles of the zoo models.

    .venv/bin/python scripts/update_golden.py            # all cases
    .venv/bin/python scripts/update_golden.py resnet18   # cases whose name contains "resnet18"

Run it only when a change to the compiled graphs is intended, then review and commit the diff.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gfcompile.diff import compare, format_text, read_snapshot, write_snapshot  # noqa: E402
from tests.golden.cases import GOLDEN_ATOL, GOLDEN_CASES, GOLDEN_IGNORE, compile_snapshot  # noqa: E402


def main(argv: list[str]) -> int:
    cases = [case for case in GOLDEN_CASES if not argv or any(word in case.name for word in argv)]
    if not cases:
        print(f"no golden case matches {argv}; cases: {[case.name for case in GOLDEN_CASES]}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="golden-") as scratch:
        for case in cases:
            fresh = compile_snapshot(case, Path(scratch) / case.name)
            if case.path.exists():
                report = compare(read_snapshot(case.path), fresh, atol=GOLDEN_ATOL, ignore=GOLDEN_IGNORE)
                status = "unchanged" if report.equal else "updated"
                if not report.equal:
                    print(format_text(report, limit=5))
            else:
                status = "created"
            write_snapshot(fresh, case.path)
            print(f"{case.path.relative_to(ROOT)}: {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

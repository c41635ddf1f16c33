"""Measure which torchvision architectures gfcompile supports, in each mode, as a Markdown table.

    .venv/bin/python scripts/supported_architectures.py -o supported.md            # every architecture
    .venv/bin/python scripts/supported_architectures.py --models resnet50,googlenet  # a few

Each architecture runs the checks of tests/test_torchvision_coverage.py (the same code, so the table
and CI cannot disagree): exact compile against torch autograd, nothing frozen or tied silently,
filtered compile trains a step and inspects, row-tiled exact compile against the untiled one. Each
architecture runs in its own process with a time limit, so a crash or a slow model costs one row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CELL_LIMIT = 160  # characters of a failure message kept in a table cell


def measure_one(name: str) -> dict:
    """Run every check on architecture `name`; {check: {"ok": bool, "text": str}} plus facts."""
    sys.path.insert(0, str(REPO))
    from tests import test_torchvision_coverage as coverage

    arch = next(arch for arch in [*coverage.FAST, *coverage.SLOW] if arch.name == name)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f"gf-{name}-") as root:
        bench = coverage.Workbench(Path(root))
        model, _ = bench.model(arch)
        results = {"params": sum(p.numel() for p in model.parameters()), "input": arch.size, "checks": {}}
        for label, check in coverage.CHECKS.items():
            try:
                results["checks"][label] = {"ok": True, "text": check(bench, arch)}
            except Exception as exc:  # an assertion or a compile error: the cell says which
                text = " ".join(str(exc).split()) or type(exc).__name__
                results["checks"][label] = {"ok": False, "text": text}
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def run_isolated(name: str, timeout: float) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--one", name]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"not finished within {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"the measuring process failed (exit {done.returncode}): {tail}"}
    return json.loads(lines[-1])


def cell(check: dict) -> str:
    text = check["text"].replace("|", "/")
    if len(text) > CELL_LIMIT:
        text = text[: CELL_LIMIT - 3] + "..."
    return f"ok: {text}" if check["ok"] else f"**fails**: {text}"


def markdown(rows: dict[str, dict], labels: list[str], command: str) -> str:
    lines = [
        "| model | input | parameters | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for name, result in rows.items():
        if "error" in result:
            lines.append(f"| {name} | | | " + " | ".join([f"**fails**: {result['error']}"] * len(labels)) + " |")
            continue
        cells = [cell(result["checks"][label]) for label in labels]
        size = f"{result['input']}x{result['input']}"
        lines.append(f"| {name} | {size} | {result['params'] / 1e6:.1f} M | " + " | ".join(cells) + " |")
    supported = sum("error" not in r and all(c["ok"] for c in r["checks"].values()) for r in rows.values())
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines += [
        "",
        f"{supported} of {len(rows)} architectures pass every check. Measured {stamp} on {platform.machine()} "
        f"({os.cpu_count()} CPUs) with `{command}`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=None, help="comma-separated architectures (default: all in the matrix)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="Markdown file to write (default: stdout)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per architecture (default 1800)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the per-architecture child process
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(measure_one(args.one)))
        return 0

    sys.path.insert(0, str(REPO))
    from tests import test_torchvision_coverage as coverage

    known = [arch.name for arch in [*coverage.FAST, *coverage.SLOW]]
    names = args.models.split(",") if args.models else known
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"not in the coverage matrix: {', '.join(unknown)} (known: {', '.join(known)})")
    rows = {}
    for index, name in enumerate(names, 1):
        print(f"[{index}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        rows[name] = run_isolated(name, args.timeout)
        if args.output is not None:  # after each row, so an interrupted run keeps what it measured
            args.output.write_text(markdown(rows, list(coverage.CHECKS), _command(args)) + "\n")
    table = markdown(rows, list(coverage.CHECKS), _command(args))
    if args.output is None:
        print(table)
    else:
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _command(args: argparse.Namespace) -> str:
    models = f" --models {args.models}" if args.models else ""
    return f"python scripts/supported_architectures.py{models}"


if __name__ == "__main__":
    raise SystemExit(main())

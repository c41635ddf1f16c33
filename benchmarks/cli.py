"""Command line: `python -m benchmarks <suite|all> [--profile quick|full] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .common import PROFILES, SuiteContext, WorkerError, available_cores, machine_info, write_suite_outputs
from .suites import SUITES


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark suites for gfcompile; each writes <suite>.json, .md and .png to --out.",
    )
    parser.add_argument("suite", choices=[*SUITES, "all"], help="which suite to run ('all': every suite in order)")
    parser.add_argument(
        "--profile", choices=PROFILES, default="quick", help="quick: CI smoke scale (minutes); full: paper scale"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder (default: %(default)s)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="ORT intra-op threads = torch threads (default: the usable cores of this machine)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="fresh processes per timed/memory configuration; >1 reports their spread (default: %(default)s)",
    )
    parser.add_argument(
        "--no-cache", action="store_true", help="re-export and recompile instead of reusing <out>/cache"
    )
    parser.add_argument(
        "--models",
        default="",
        help="memory/step only: comma-separated zoo models of the profile to run (default: all)",
    )
    parser.add_argument(
        "--variants",
        default="",
        help="memory/step only: comma-separated variants to run, e.g. ort_tiled,ort_tiled_filtered "
        "(torch_exact and ort_exact always run: every ratio is against them; default: all)",
    )
    return parser


def _names(text: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in text.split(",") if name.strip())


def _check_filters(profile: str, models: tuple[str, ...], variants: tuple[str, ...]) -> str | None:
    """A one-line error for --models / --variants names the memory and step suites do not know."""
    from .training import SETTINGS, VARIANTS

    known = sorted({config.model for config in SETTINGS[profile].configs})
    if set(models) - set(known):
        return (
            f"--models: {', '.join(sorted(set(models) - set(known)))} not in the {profile} profile ({', '.join(known)})"
        )
    if set(variants) - set(VARIANTS):
        return f"--variants: unknown {', '.join(sorted(set(variants) - set(VARIANTS)))} (choose from {', '.join(VARIANTS)})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    threads = args.threads or available_cores()
    if threads < 1 or args.repeat < 1:
        _log("--threads and --repeat must be >= 1")
        return 2
    problem = _check_filters(args.profile, _names(args.models), _names(args.variants))
    if problem:
        _log(problem)
        return 2
    ctx = SuiteContext(
        profile=args.profile,
        out_dir=args.out,
        threads=threads,
        repeat=args.repeat,
        use_cache=not args.no_cache,
        log=_log,
        models=_names(args.models),
        variants=_names(args.variants),
    )
    names = list(SUITES) if args.suite == "all" else [args.suite]
    failed = []
    for name in names:
        suite = SUITES[name]
        machine = machine_info(threads)
        _log(f"== {name} ({args.profile}, {threads} threads) ==")
        started = time.perf_counter()
        try:
            result = suite.run(ctx)
        except WorkerError as exc:
            # One broken suite should not cost the others' (long) measurements under `all`.
            _log(f"{name} failed: {exc}")
            failed.append(name)
            continue
        paths = write_suite_outputs(ctx, suite, result, machine, time.perf_counter() - started)
        print(paths["markdown"].read_text())
        _log(f"{name}: wrote " + ", ".join(str(p) for p in paths.values()))
    if failed:
        _log(f"failed suites: {', '.join(failed)}")
        return 1
    return 0

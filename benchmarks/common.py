"""Plumbing shared by the suites: profiles, machine info, worker subprocesses, probes and output files.

Everything here is light to import (standard library only at module level) because the
worker subprocesses import it too, and a measuring process should load nothing it does
not measure.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parent.parent
Profile = Literal["quick", "full"]
PROFILES: tuple[Profile, ...] = ("quick", "full")
MIB = 1024 * 1024


class WorkerError(RuntimeError):
    """A configuration's subprocess failed; the message carries the tail of its stderr."""


# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------


@dataclass
class SuiteContext:
    """What a suite needs from the command line."""

    profile: Profile
    out_dir: Path
    threads: int
    repeat: int = 1
    use_cache: bool = True
    log: Callable[[str], None] = print
    # Restrictions for the memory and step suites (empty: everything in the profile).
    models: tuple[str, ...] = ()
    variants: tuple[str, ...] = ()

    @property
    def cache_dir(self) -> Path:
        # Exported models and compiled artifacts, reused across suites and runs (see training.py).
        return self.out_dir / "cache"


@dataclass
class SuiteResult:
    """Raw numbers (JSON-serialisable), the Markdown report and an optional plot writer."""

    data: dict[str, Any]
    markdown: str
    plot: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class Suite:
    name: str
    summary: str
    run: Callable[[SuiteContext], SuiteResult]


# --------------------------------------------------------------------------------------
# Machine
# --------------------------------------------------------------------------------------


def available_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    # importlib.metadata, not `import torch`: the parent should not pay for (or be changed by) torch.
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine_info(threads: int) -> dict[str, Any]:
    """CPU, cores, thread counts, load and library versions: what a reader needs to trust a number."""
    return {
        "cpu_model": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": available_cores(),
        "ort_intra_op_threads": threads,
        "torch_threads": threads,
        "memory_total_gib": _memory_total_gib(),
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("onnxruntime-training-cpu", "onnx", "onnx-graphsurgeon", "numpy", "torch", "matplotlib")
        },
    }


def machine_line(info: dict[str, Any]) -> str:
    load = info.get("loadavg_1_5_15", [])
    return (
        f"Machine: {info['cpu_model']}, {info['usable_cores']} usable cores, "
        f"ORT intra-op threads = torch threads = {info['ort_intra_op_threads']}, "
        f"load average at start {load[0] if load else '?'}; "
        f"onnxruntime-training {info['versions'].get('onnxruntime-training-cpu')}, "
        f"torch {info['versions'].get('torch')}."
    )


# --------------------------------------------------------------------------------------
# Worker subprocesses
# --------------------------------------------------------------------------------------


def run_worker(
    task: str,
    params: dict[str, Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 1200.0,
    python: str | None = None,
) -> dict[str, Any]:
    """Run one configuration in a fresh `python -m benchmarks.worker` process and return its result.

    `python`: the interpreter (default: this one), e.g. a venv with plain onnxruntime for tasks
    that need only numpy and onnxruntime.

    A fresh process per configuration keeps allocator state, thread pools, kernel caches and
    the peak-RSS counter of one configuration from leaking into the next.
    """
    with tempfile.TemporaryDirectory(prefix="gfbench-") as tmp:
        result_path = Path(tmp) / "result.json"
        command = [
            # Through a shell that forks (it cannot exec the command: another one follows): Linux
            # carries the parent's RSS high-water mark over exec into ru_maxrss, so a worker started
            # directly by this (large) process would report the parent's peak, not its own.
            "/bin/sh",
            "-c",
            '"$@"; exit $?',
            "sh",
            python or sys.executable,
            "-m",
            "benchmarks.worker",
            task,
            "--params",
            json.dumps(params),
            "--result",
            str(result_path),
        ]
        child_env = dict(os.environ)
        # The repo root holds `benchmarks`, `models` and `tests` (not all of them are installed).
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env.update(env or {})
        try:
            proc = subprocess.run(
                command,
                cwd=REPO_ROOT,
                env=child_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise WorkerError(f"worker {task} timed out after {timeout:.0f} s with {params}") from None
        if proc.returncode != 0 or not result_path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
            raise WorkerError(f"worker {task} failed (exit {proc.returncode}) with {params}:\n{tail}")
        return json.loads(result_path.read_text())


# --------------------------------------------------------------------------------------
# Probes (used inside workers)
# --------------------------------------------------------------------------------------


def current_rss_bytes() -> int:
    """Resident set size now, from /proc/self/statm (ru_maxrss only knows the peak)."""
    with open("/proc/self/statm") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """ru_maxrss of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0: clear_refs 5).

    Without it, ru_maxrss right after loading already holds the loading transient (ORT's
    graph optimisation, torch's first kernel selection), which can hide a smaller step peak.
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def timing_stats(times: Sequence[float]) -> dict[str, Any]:
    """Median and spread of repeated timings (seconds). `iqr_rel` = interquartile range / median."""
    ordered = sorted(times)
    n = len(ordered)
    median = statistics.median(ordered)
    if n >= 4:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1, q3 = ordered[0], ordered[-1]
    return {
        "n": n,
        "median_s": median,
        "min_s": ordered[0],
        "max_s": ordered[-1],
        "iqr_rel": (q3 - q1) / median if median > 0 else 0.0,
        "times_s": list(times),
    }


def repeat_timed(
    fn: Callable[[], object],
    *,
    warmup: int,
    min_reps: int,
    min_time_s: float,
    max_reps: int,
) -> list[float]:
    """Call `fn` `warmup` times untimed, then time it at least `min_reps` times and `min_time_s` in total."""
    for _ in range(warmup):
        fn()
    gc.collect()
    times: list[float] = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_time_s):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return times


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------


def fmt(value: float | int | None, digits: int = 2) -> str:
    """Numbers for tables: fixed digits, thousands separators for big ones, '—' for missing."""
    if value is None:
        return "—"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def md_table(
    headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1, text_columns: Sequence[int] = ()
) -> str:
    """A GitHub Markdown table; columns from `numeric_from` on are right-aligned, except `text_columns`."""
    align = ["---" if i < numeric_from or i in text_columns else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_suite_outputs(
    ctx: SuiteContext,
    suite: Suite,
    result: SuiteResult,
    machine: dict[str, Any],
    wall_s: float,
) -> dict[str, Path]:
    """Write <suite>.json (raw numbers + machine), <suite>.md and <suite>.png into the out dir."""
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    machine = {**machine, "loadavg_1_5_15_end": [round(v, 2) for v in os.getloadavg()]}
    paths = {"json": ctx.out_dir / f"{suite.name}.json", "markdown": ctx.out_dir / f"{suite.name}.md"}
    payload = {
        "suite": suite.name,
        "profile": ctx.profile,
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "wall_s": round(wall_s, 1),
        "machine": machine,
        "data": result.data,
    }
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n")
    header = (
        f"# {suite.name}: {suite.summary}\n\n"
        f"Profile `{ctx.profile}`, {wall_s:.0f} s. {machine_line(machine)} "
        f"Load average at end {machine['loadavg_1_5_15_end'][0]}.\n\n"
    )
    paths["markdown"].write_text(header + result.markdown.rstrip() + "\n")
    if result.plot is not None:
        import matplotlib

        matplotlib.use("Agg")  # headless CI and devices: never open a window
        paths["png"] = ctx.out_dir / f"{suite.name}.png"
        result.plot(paths["png"])
    return paths

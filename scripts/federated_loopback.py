"""A real Flower deployment on loopback: a SuperLink and N SuperNodes as separate processes.

    .venv/bin/python scripts/federated_loopback.py ARTIFACTS --train-data TRAIN.npz --test-data TEST.npz \
        -o OUT/ [--supernodes 3] [--rounds 2] [--local-steps 5] [--strategy fedprox --proximal-mu 0.01]

It starts `flower-superlink` and one `flower-supernode` per partition (each told its
partition-id through --node-config), submits the Flower App in scripts/federated_app with
`flwr run`, waits for the run's round log in OUT/, and then shuts every process down (SIGTERM,
then SIGKILL for anything left, children included). The last line on stdout is a JSON summary
with the pids it started and any that were still alive at the end (none, normally).
Everything listens on 127.0.0.1 only, and Flower's telemetry is off.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tomli_w

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gfcompile.errors import GfError  # noqa: E402
from gfcompile.federate import LOG_NAME, FederateConfig  # noqa: E402

APP_DIR = Path(__file__).resolve().parent / "federated_app"
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise GfError(f"the SuperLink exited with code {process.returncode} before listening on port {port}")
        with socket.socket() as probe:
            if probe.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.2)
    raise GfError(f"the SuperLink did not listen on {HOST}:{port} within {timeout:.0f} s")


def children_of(pids: set[int]) -> set[int]:
    """Every live descendant of `pids` (from /proc), so that nothing a SuperNode spawned is missed."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name may hold spaces or parentheses; the ppid follows its closing ")".
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = set(pids)
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier and pid not in found}
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait() is missing


def shut_down(processes: list[subprocess.Popen], grace: float = 15.0) -> list[int]:
    """SIGTERM what was started (their children follow via Flower's --parent-pid), then SIGKILL stragglers."""
    started = {process.pid for process in processes}
    tracked = started | children_of(started)
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
    while time.monotonic() < deadline and any(alive(pid) for pid in tracked):
        time.sleep(0.2)
    for pid in sorted(tracked):
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
    time.sleep(0.2)
    return sorted(pid for pid in tracked if alive(pid))


def run_loopback(config: FederateConfig, supernodes: int, run_timeout: float = 600.0, keep: Path | None = None) -> dict:
    """Start the processes, run the app, stop everything; returns the summary (round log included)."""
    if config.num_clients != supernodes:
        raise GfError(f"the run expects {config.num_clients} clients but {supernodes} SuperNodes would start")
    bin_dir = Path(sys.executable).parent
    for tool in ("flower-superlink", "flower-supernode", "flwr"):
        if not (bin_dir / tool).exists():
            raise GfError(f"{bin_dir / tool} is missing: install the Flower extra (pip install -e '.[federated]')")
    work = Path(tempfile.mkdtemp(prefix="gf-flwr-"))
    logs = keep or work
    logs.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    home.mkdir()
    link_port = free_port()
    (home / "config.toml").write_text(
        tomli_w.dumps(
            {"superlink": {"default": "loopback", "loopback": {"address": f"{HOST}:{link_port}", "insecure": True}}}
        )
    )
    # The app folder is copied so that flwr's module check and builds write nothing into the repo.
    app = work / "app"
    shutil.copytree(APP_DIR, app, ignore=shutil.ignore_patterns("__pycache__"))
    run_config = work / "run_config.toml"
    run_config.write_text(tomli_w.dumps(config.run_config()))
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    processes: list[subprocess.Popen] = []
    handles = []

    def start(name: str, command: list[str]) -> subprocess.Popen:
        handle = open(logs / f"{name}.log", "w")  # noqa: SIM115 (closed in the finally below)
        handles.append(handle)
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=work, start_new_session=True
        )
        processes.append(process)
        return process

    summary: dict = {"workdir": str(work), "logs": str(logs)}
    started = time.perf_counter()
    try:
        link = start(
            "superlink",
            [
                str(bin_dir / "flower-superlink"),
                "--insecure",
                "--disable-runtime-dependency-installation",  # no network: the venv already has everything
                "--host",
                HOST,
                "--port",
                str(link_port),
            ],
        )
        wait_for_port(link_port, link, timeout=60)
        for index in range(supernodes):
            start(
                f"supernode{index}",
                [
                    str(bin_dir / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"{HOST}:{link_port}",
                    "--host",
                    HOST,
                    "--port",
                    str(free_port()),
                    "--node-config",
                    f"partition-id={index} num-partitions={supernodes}",
                ],
            )
        log_path = config.out / LOG_NAME
        log_path.unlink(missing_ok=True)
        try:
            run = subprocess.run(
                [str(bin_dir / "flwr"), "run", str(app), "loopback", "--run-config", str(run_config), "--stream"],
                env=env,
                cwd=work,
                capture_output=True,
                text=True,
                timeout=run_timeout,
            )
        except subprocess.TimeoutExpired:
            raise GfError(f"the federated run did not finish within {run_timeout:.0f} s; logs in {logs}") from None
        (logs / "flwr_run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            last = (run.stderr or run.stdout).strip().splitlines()[-1:] or ["no output"]
            raise GfError(f"flwr run failed with code {run.returncode}: {last[0]} (logs in {logs})")
        deadline = time.monotonic() + 30
        while not log_path.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not log_path.is_file():
            raise GfError(f"the run ended without writing {log_path}; see {logs}/flwr_run.log")
        summary["log"] = json.loads(log_path.read_text())
    finally:
        summary["pids"] = sorted({process.pid for process in processes} | children_of({p.pid for p in processes}))
        summary["leftover_pids"] = shut_down(processes)
        summary["wall_s"] = time.perf_counter() - started
        for handle in handles:
            handle.close()
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("artifacts", type=Path, help="gfcompile artifacts folder or device bundle")
    parser.add_argument("--train-data", type=Path, required=True, help=".npz split across the SuperNodes")
    parser.add_argument("--test-data", type=Path, required=True, help=".npz the server evaluates on")
    parser.add_argument("-o", "--out", type=Path, required=True, help="folder for the round log, plot and parameters")
    parser.add_argument("--supernodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=0.5, help="Dirichlet alpha of the class split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    parser.add_argument("--proximal-mu", type=float, default=0.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take")
    parser.add_argument("--keep-logs", type=Path, default=None, help="write the processes' logs here")
    args = parser.parse_args(argv)
    try:
        config = FederateConfig(
            artifacts=args.artifacts.resolve(),
            train_data=args.train_data.resolve(),
            test_data=args.test_data.resolve(),
            out=args.out.resolve(),
            num_clients=args.supernodes,
            rounds=args.rounds,
            local_steps=args.local_steps,
            alpha=args.alpha,
            seed=args.seed,
            strategy=args.strategy,
            proximal_mu=args.proximal_mu,
            timeout_s=args.timeout,
        )
        summary = run_loopback(config, args.supernodes, run_timeout=args.timeout, keep=args.keep_logs)
    except GfError as exc:
        print(f"federated_loopback: error: {exc}", file=sys.stderr)
        return 2
    for entry in summary["log"]["rounds"]:
        accuracy = entry["accuracy"]
        print(
            f"round {entry['round']}: accuracy {accuracy:.3f}, {len(entry['clients'])} clients, {entry['time_s']:.1f} s",
            file=sys.stderr,
        )
    print(json.dumps({key: value for key, value in summary.items() if key != "log"}))
    return 0 if not summary["leftover_pids"] else 1


if __name__ == "__main__":
    sys.exit(main())

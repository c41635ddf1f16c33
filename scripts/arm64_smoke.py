"""Train a device bundle on an emulated arm64 Debian and compare it with the x86 training build.

    nice -n 19 .venv/bin/python scripts/arm64_smoke.py [--root /opt/arm64root] [--work DIR] [--json FILE]

Each setup step is skipped when its result is already there:

1. an arm64 Debian trixie userland (python3, python3-venv, libstdc++6) under ROOT, unpacked by
   `mmdebstrap --variant=extract` (no maintainer script runs, so nothing is emulated and no
   binfmt_misc handler is registered); every arm64 program runs as `qemu-aarch64 -L ROOT ...`;
2. aarch64 wheels of onnxruntime, numpy and safetensors (`pip download --platform ...`) and the
   runtime's own wheel, built from a copy of runtime/ (no build/ folder lands in the checkout);
3. a venv of the emulated Python 3.13 holding the README's Deploy install: plain onnxruntime,
   numpy and the runtime wheel, unpacked by this machine's pip (see ensure_venv).

Then the demo model is compiled and bundled here (`gfcompile ... --filter-layers 4`, `gfcompile
bundle`), the emulated venv trains the bundle with the device runner (`python -m runtime BUNDLE
--data DATA.npz --steps 3 --export m.onnx`, what `gftrain` runs), and a probe (this file run with
`--probe`, importing only the installed runtime) trains the same batches in each interpreter to
record every loss at full precision: the training build (onnxruntime-training) here, the portable
step under emulation. Losses and every trained parameter (the probe's, and the runner's safetensors
checkpoint) must agree within TOLERANCE; the exit code is 0 when they do.

Emulation is CPU-heavy: run it under `nice -n 19` on a shared machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]
MODEL = CHECKOUT / "models" / "zoo" / "mobilenetv2_digits.onnx"
DATA = CHECKOUT / "models" / "data" / "digits_5to9_train.npz"
# Batch 8 rather than the default 32: an emulated step of batch 8 took 40-50 s of wall time on the
# loaded shared 2-core machine at nice 19.
COMPILE_OPTIONS = ["--filter-layers", "4", "--batch-size", "8"]
STEPS = 3
TOLERANCE = 1e-5
# The Raspberry Pi 4's core (ARMv8.0-A: NEON, no dot product, no SVE): onnxruntime takes the kernels
# such a board runs, and qemu emulates no SVE.
CPU = "cortex-a72"
SUITE = "trixie"  # Debian 13: Python 3.13, for which onnxruntime publishes aarch64 wheels
PYTHON_VERSION = "3.13"
WHEEL_PLATFORMS = ["manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64"]
DEVICE_PACKAGES = ["onnxruntime", "numpy", "safetensors"]
# python3-venv for the venv; numpy's and onnxruntime's wheels link the system's libstdc++.
USERLAND_PACKAGES = ["python3", "python3-venv", "libstdc++6"]
CPUINFO_ENTRY = (
    "processor\t: {index}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
    "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n"
)
VENV_IN_ROOT = Path("opt/gfcompile-venv")
WHEELS_IN_ROOT = Path("opt/gfcompile-wheels")
RUNTIME_STAMP = "gfcompile-runtime.sha256"  # in the venv: the runtime sources its installed wheel was built from
PARAMETER_PREFIX = "parameter/"


class SmokeError(Exception):
    """A setup step that cannot be done here; main prints it as one line."""


# ---------------------------------------------------------------------------------------------
# The probe: runs inside either interpreter, with only the installed runtime and numpy importable
# ---------------------------------------------------------------------------------------------


def probe(bundle: Path, data_path: Path, out: Path, steps: int, seed: int) -> None:
    """Train `steps` steps on gftrain's batches (runtime.data.batches, as Trainer.fit takes them)."""
    import itertools
    import platform
    import time

    import numpy as np
    import onnxruntime

    from runtime.bundle import open_trainer
    from runtime.data import batches, load_data

    trainer = open_trainer(bundle)
    data = load_data(data_path, trainer.manifest)
    losses, seconds, cpu_seconds = [], [], []
    for x, y in itertools.islice(batches(data, trainer.batch_size, seed), steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(trainer.train_step(x, y))
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    parameters = {PARAMETER_PREFIX + name: value for name, value in trainer.parameters().items()}
    np.savez(
        out,
        losses=np.array(losses, dtype=np.float64),
        step_seconds=np.array(seconds),
        step_cpu_seconds=np.array(cpu_seconds),
        **parameters,
    )
    print(
        json.dumps(
            {
                "machine": platform.machine(),
                "python": platform.python_version(),
                "onnxruntime": onnxruntime.__version__,
                "backend": type(trainer).__name__,
                "batch_size": trainer.batch_size,
            }
        )
    )


# ---------------------------------------------------------------------------------------------
# Setup on the host
# ---------------------------------------------------------------------------------------------


def _run(command: list, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise SmokeError(f"{Path(str(command[0])).name} failed (exit {result.returncode}): {' | '.join(tail)}")
    return result


def _emulated_env() -> dict[str, str]:
    # Nothing of this Python's environment leaks in; bytecode is written so later runs skip compiling.
    return {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}


def emulated(root: Path, program: Path, *arguments, timeout: float | None = None) -> subprocess.CompletedProcess:
    """Run an arm64 program of the userland; ROOT is its library prefix (qemu-aarch64 -L)."""
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    return _run([qemu, "-cpu", CPU, "-L", root, program, *arguments], env=_emulated_env(), timeout=timeout)


def missing_tools() -> list[str]:
    qemu = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
    return [name for name, found in (("qemu-aarch64", qemu), ("mmdebstrap", shutil.which("mmdebstrap"))) if not found]


def ensure_userland(root: Path) -> None:
    python = root / "usr" / "bin" / "python3"
    if not python.exists():
        missing = missing_tools()
        if missing:
            raise SmokeError(f"{' and '.join(missing)} not installed; as root: apt-get install -y qemu-user mmdebstrap")
        print(f"unpacking Debian {SUITE} arm64 ({', '.join(USERLAND_PACKAGES)}) into {root} ...", flush=True)
        # No mirror named: mmdebstrap takes Debian's default one for the suite.
        include = "--include=" + ",".join(USERLAND_PACKAGES)
        _run(["mmdebstrap", "--arch=arm64", "--variant=extract", include, SUITE, root])
    if not any((root / "usr" / "lib" / "aarch64-linux-gnu").glob("libstdc++.so.6*")):
        raise SmokeError(f"{root} has no libstdc++ (made before it was included): remove it and run again")
    # The extract variant unpacks packages only; usr-merge's top-level links come from a maintainer
    # script, and the dynamic loader is looked up as /lib/ld-linux-aarch64.so.1.
    for name in ("bin", "sbin", "lib"):
        link = root / name
        if not link.exists() and not link.is_symlink():
            link.symlink_to(Path("usr") / name)
    # qemu-user 7.2 passes the host's x86 /proc/cpuinfo through, and onnxruntime's CPU detection
    # (pytorch/cpuinfo) dereferences NULL on it while loading. `-L ROOT` looks every absolute path
    # up under ROOT first, so the guest reads what a board with CPU's cores shows, one per host CPU.
    cpus = int(Path("/sys/devices/system/cpu/present").read_text().strip().split("-")[-1]) + 1
    cpuinfo = root / "proc" / "cpuinfo"
    cpuinfo.parent.mkdir(exist_ok=True)
    cpuinfo.write_text("".join(CPUINFO_ENTRY.format(index=index) for index in range(cpus)))


def runtime_digest() -> str:
    digest = hashlib.sha256()
    source = CHECKOUT / "runtime"
    for path in sorted([*source.glob("*.py"), source / "pyproject.toml"]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def ensure_wheels(wheels: Path) -> Path:
    """The device packages' aarch64 wheels and a fresh runtime wheel; returns the runtime wheel."""
    wheels.mkdir(parents=True, exist_ok=True)
    if not any(wheels.glob("onnxruntime-*aarch64*.whl")):
        print(f"downloading aarch64 wheels of {', '.join(DEVICE_PACKAGES)} ...", flush=True)
        platforms = [argument for tag in WHEEL_PLATFORMS for argument in ("--platform", tag)]
        _run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms]
            + ["--python-version", PYTHON_VERSION, "--implementation", "cp", "-d", wheels, *DEVICE_PACKAGES]
        )
    for old in wheels.glob("gfcompile_runtime-*.whl"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "runtime"
        shutil.copytree(
            CHECKOUT / "runtime", source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info")
        )
        _run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", source, "-w", wheels]
        )
    (wheel,) = wheels.glob("gfcompile_runtime-*.whl")
    return wheel


def ensure_venv(root: Path, wheels: Path, runtime_wheel: Path) -> Path:
    """A venv of the emulated Python with the README's Deploy install; returns its python.

    Its pip runs here: pip under emulation took over 40 minutes of this shared machine only to
    install itself. `pip install --target` with the arm64 platform tags unpacks the same aarch64
    wheels, resolved the same way, into the venv's site-packages.
    """
    venv = root / VENV_IN_ROOT
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating the arm64 venv {venv} (emulated) ...", flush=True)
        emulated(root, root / "usr" / "bin" / "python3", "-I", "-m", "venv", "--without-pip", venv)
    stamp = venv / RUNTIME_STAMP
    digest = runtime_digest()
    if not stamp.exists() or stamp.read_text().strip() != digest:
        print("installing onnxruntime, numpy and the runtime wheel into the arm64 venv ...", flush=True)
        (site_packages,) = (venv / "lib").glob("python3.*/site-packages")
        platforms = [argument for tag in WHEEL_PLATFORMS for argument in ("--platform", tag)]
        _run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index"]
            + ["--only-binary=:all:", *platforms, "--python-version", PYTHON_VERSION, "--implementation", "cp"]
            + ["--no-compile", "--upgrade", "--target", site_packages, "--find-links", wheels]
            + ["onnxruntime", "numpy", runtime_wheel]
        )
        stamp.write_text(digest + "\n")
    return python


def ensure_bundle(work: Path) -> Path:
    """The demo model compiled and bundled by this checkout's gfcompile (the training build)."""
    gfcompile = Path(sys.executable).with_name("gfcompile")
    artifacts, bundle = work / "artifacts", work / "bundle"
    shutil.rmtree(bundle, ignore_errors=True)
    print(f"compiling {MODEL.name} {' '.join(COMPILE_OPTIONS)} and bundling it into {bundle} ...", flush=True)
    _run([gfcompile, MODEL, *COMPILE_OPTIONS, "-o", artifacts, "--force", "-q"])
    _run([gfcompile, "bundle", artifacts, "-o", bundle])
    return bundle


# ---------------------------------------------------------------------------------------------
# The comparison
# ---------------------------------------------------------------------------------------------


def run_probe(command: list, bundle: Path, out: Path, timeout: float | None = None) -> dict:
    arguments = ["-I", Path(__file__).resolve(), "--probe", bundle, DATA, out, "--steps", str(STEPS)]
    result = command(*arguments, timeout=timeout)
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(reference: Path, candidate: dict, trainable: list[str]) -> float:
    """Largest |difference| over every trained parameter; a missing or reshaped one is a SmokeError."""
    import numpy as np

    with np.load(reference) as expected:
        worst = 0.0
        for name in trainable:
            if name not in candidate:
                raise SmokeError(f"{name}: not in the arm64 run's parameters")
            want = expected[PARAMETER_PREFIX + name]
            if candidate[name].shape != want.shape:
                raise SmokeError(f"{name}: shape {candidate[name].shape} on arm64, {want.shape} on x86")
            worst = max(worst, float(np.abs(candidate[name].astype(np.float64) - want).max()))
    return worst


def smoke(root: Path, work: Path, timeout: float) -> dict:
    import numpy as np
    from safetensors.numpy import load_file

    ensure_userland(root)
    runtime_wheel = ensure_wheels(root / WHEELS_IN_ROOT)
    python = ensure_venv(root, root / WHEELS_IN_ROOT, runtime_wheel)
    work.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(work)

    def host(*arguments, timeout=None):
        return _run([sys.executable, *arguments], env=_emulated_env(), timeout=timeout)

    def arm64(*arguments, timeout=None):
        return emulated(root, python, *arguments, timeout=timeout)

    print("training 3 steps with the training build here (x86_64) ...", flush=True)
    x86 = run_probe(host, bundle, work / "x86.npz")
    print("training 3 steps on arm64 (emulated; minutes) ...", flush=True)
    device = run_probe(arm64, bundle, work / "arm64.npz", timeout=timeout)

    # The README's device runner (gftrain's entry point), writing its checkpoint beside the bundle.
    checkpoint, exported = work / "gftrain_checkpoint.safetensors", work / "m.onnx"
    for stale in (checkpoint, checkpoint.with_name(checkpoint.name + ".sha256"), exported):
        stale.unlink(missing_ok=True)
    cli = ["-I", "-m", "runtime", bundle, "--data", DATA, "--steps", str(STEPS), "--export", exported]
    cli += ["--checkpoint", checkpoint]
    print("python " + " ".join(str(part) for part in cli) + "  (arm64, emulated) ...", flush=True)
    gftrain_output = arm64(*cli, timeout=timeout)

    with np.load(work / "x86.npz") as reference, np.load(work / "arm64.npz") as candidate:
        trainable = [key.removeprefix(PARAMETER_PREFIX) for key in reference if key.startswith(PARAMETER_PREFIX)]
        x86_losses, arm64_losses = reference["losses"], candidate["losses"]
        probe_parameters = {name: candidate[PARAMETER_PREFIX + name] for name in trainable}
        # Wall time depends on the machine's load; CPU time (the emulator's, under qemu) less so.
        seconds = {
            side: (run["step_seconds"], run["step_cpu_seconds"])
            for side, run in (("x86", reference), ("arm64", candidate))
        }
    report = {
        "x86": x86,
        "arm64": device,
        "debian": SUITE,
        "trainable_tensors": len(trainable),
        "trainable_values": int(sum(value.size for value in probe_parameters.values())),
        "x86_losses": x86_losses.tolist(),
        "arm64_losses": arm64_losses.tolist(),
        "loss_max_abs_diff": float(np.abs(x86_losses - arm64_losses).max()),
        "parameter_max_abs_diff": compare(work / "x86.npz", probe_parameters, trainable),
        "gftrain_checkpoint_max_abs_diff": compare(work / "x86.npz", load_file(str(checkpoint)), trainable),
        "gftrain_stdout": gftrain_output.stdout.strip().splitlines(),
        "x86_step_seconds": seconds["x86"][0].tolist(),
        "x86_step_cpu_seconds": seconds["x86"][1].tolist(),
        "arm64_emulated_step_seconds": seconds["arm64"][0].tolist(),
        "arm64_emulated_step_cpu_seconds": seconds["arm64"][1].tolist(),
    }
    report["within_tolerance"] = (
        max(report["loss_max_abs_diff"], report["parameter_max_abs_diff"], report["gftrain_checkpoint_max_abs_diff"])
        <= TOLERANCE
    )
    return report


def _times(report: dict, prefix: str) -> str:
    pairs = zip(report[f"{prefix}_seconds"], report[f"{prefix}_cpu_seconds"], strict=True)
    return " ".join(f"{wall:.2f}/{cpu:.2f}" for wall, cpu in pairs)


def summary(report: dict) -> str:
    device, x86 = report["arm64"], report["x86"]
    return "\n".join(
        [
            f"arm64: Debian {report['debian']} {device['machine']} (qemu-user), Python {device['python']}, "
            f"onnxruntime {device['onnxruntime']}, backend {device['backend']}",
            f"x86:   {x86['machine']}, Python {x86['python']}, onnxruntime {x86['onnxruntime']}, backend {x86['backend']}",
            f"losses x86   {' '.join(f'{v:.7f}' for v in report['x86_losses'])}",
            f"losses arm64 {' '.join(f'{v:.7f}' for v in report['arm64_losses'])}",
            f"max |diff|: loss {report['loss_max_abs_diff']:.2g}, {report['trainable_tensors']} trained tensors "
            f"({report['trainable_values']} values) {report['parameter_max_abs_diff']:.2g}, gftrain's checkpoint "
            f"{report['gftrain_checkpoint_max_abs_diff']:.2g} (tolerance {TOLERANCE:g})",
            f"step seconds (wall/CPU): x86 training build {_times(report, 'x86_step')}; "
            f"arm64 emulated {_times(report, 'arm64_emulated_step')}",
            "PASS" if report["within_tolerance"] else "FAIL: beyond the tolerance",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(os.environ.get("GF_ARM64_ROOT", "/opt/arm64root")))
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "gfcompile_arm64_smoke")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds for each emulated training run")
    parser.add_argument("--probe", nargs=3, type=Path, metavar=("BUNDLE", "DATA", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(*args.probe, steps=args.steps, seed=args.seed)
        return 0
    try:
        report = smoke(args.root.resolve(), args.work.resolve(), args.timeout)
    except (SmokeError, subprocess.TimeoutExpired) as exc:
        print(f"arm64_smoke: error: {exc}", file=sys.stderr)
        return 2
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report))
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Does the portable train step keep save_early's order, and what does the order do to peak memory?

    python -m benchmarks.portable_order [--cases deeplab mobilenet_v2 ...] [--steps 2]
        [--portable-python PYTHON] [--work-dir DIR [--compile-only]] [-o bench_results/portable_order.json]

save_early ties the summaries the backward keeps (the pooled inputs of filtered convs, the ReLU
masks) to the forward with onnxruntime-training's PassThrough, so ORT computes them while the
full-resolution tensor is still in use and frees that tensor in the forward. The portable step
lowers the barrier to standard ops (`passes/lower_training_ops.py`). For each case this measures:

- `training build`: the training artifacts on onnxruntime-training (its PassThrough barriers);
- `portable, ordered`: `train_step.onnx` as compiled (the barrier lowered to a data-dependent Reshape);
- `portable, Identity`: the same step with each barrier's Reshape replaced by an Identity of x and
  the dead ordering nodes dropped, which is what lowering PassThrough to Identity nodes gives;
- `portable, no save_early`: the same compile without the save_early pass;

each portable one on this interpreter's onnxruntime (the training wheel, 1.19) and on
`--portable-python`'s (a venv with the newest plain onnxruntime). Each run is a fresh process with
ORT's CPU arena off and glibc's mmap threshold fixed (as the memory suite), so VmHWM follows live
tensors: peak = VmHWM over load and the first step; step peak = VmHWM over `--steps` later steps
after a reset. A second session with ORT's profiler gives the execution order; "in forward" counts
the summaries whose producing nodes all ran before the first backward node. The ordered and Identity steps
get the same random feeds and their outputs are compared bitwise.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# As the memory suite (benchmarks/training.py MEMORY_ENV): every big tensor its own mapping.
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
IDENTITY_STEP = "train_step_identity.onnx"
NCHWC_SUFFIX = "_nchwc"


@dataclass(frozen=True)
class Case:
    model: str
    size: int
    batch: int
    filter_layers: int = 4
    row_tiles: int = 0
    patch_size_map: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        tiles = f", rows K={self.row_tiles}" if self.row_tiles else ""
        return f"{self.model} {self.size}² b{self.batch} filter {self.filter_layers}{tiles}"


# DeepLab's ASPP image-pooling conv sees a 1x1 map: only r = 1 fits it (as benchmarks/training.py).
_DEEPLAB_MAP = {"classifier.0.convs.4.1.weight": 1}
CASES = {
    "deeplab": Case("deeplabv3_resnet18", 512, 8, patch_size_map=_DEEPLAB_MAP),
    "deeplab_tiled": Case("deeplabv3_resnet18", 512, 8, row_tiles=8, patch_size_map=_DEEPLAB_MAP),
    "mobilenet_v2": Case("mobilenet_v2", 224, 8),
    "mobilenet_v2_tiled": Case("mobilenet_v2", 224, 8, row_tiles=8),
    "resnet18": Case("resnet18", 224, 8),
    "resnet18_tiled": Case("resnet18", 224, 8, row_tiles=8),
}


# ---------------------------------------------------------------------------------------------
# The measuring process: onnxruntime and numpy only (it also runs under a plain-onnxruntime venv).
# ---------------------------------------------------------------------------------------------


def measure(job: dict) -> dict:
    """Load `job["model"]`, run one step, then `job["steps"]` timed steps; peaks, times, output digest, order."""
    import numpy as np
    import onnxruntime as ort

    options = _options(ort, job["options"])
    if job["kind"] == "training":
        run, close = _training_build(ort, job, options)
    else:
        run, close = _portable(ort, np, job, options)
    digest = run()
    loaded_peak = _high_water_mib()
    _reset_high_water()
    times = []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    step_peak = _high_water_mib()
    close()
    profile = job["profile_prefix"]
    options = _options(ort, job["options"])
    options.enable_profiling = True
    options.profile_file_prefix = profile
    if job["kind"] == "training":
        run, close = _training_build(ort, job, options)
    else:
        run, close = _portable(ort, np, job, options)
    run()
    close()  # writes the profile
    # The training build's optimizer session writes a profile too: the step's is the longest.
    order = max((_profiled_order(path) for path in Path(profile).parent.glob(Path(profile).name + "*.json")), key=len)
    return {
        "onnxruntime": ort.__version__,
        "python": ".".join(map(str, sys.version_info[:3])),
        "peak_mib": max(loaded_peak, step_peak),
        "step_peak_mib": step_peak,
        "step_ms": float(np.median(times) * 1e3),
        "digest": digest,
        "order": order,
        "loadavg": os.getloadavg()[0],
    }


def _profiled_order(path: Path) -> list[str]:
    """The node names of an ORT profile in the order the nodes ran."""
    events = json.loads(path.read_text())
    order = [e["name"].removesuffix("_kernel_time") for e in events if e.get("cat") == "Node"]
    return [name for name in order if not name.endswith(("_fence_before", "_fence_after"))]


def _options(ort, requested: dict):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, requested["graph_optimization_level"])
    options.execution_order = getattr(ort.ExecutionOrder, requested["execution_order"])
    options.enable_mem_pattern = requested["enable_mem_pattern"]
    options.enable_mem_reuse = requested["enable_mem_reuse"]
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    return options


def _portable(ort, np, job: dict, options):
    session = ort.InferenceSession(job["model"], options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for value in sorted(session.get_inputs(), key=lambda v: v.name):
        role = job["roles"].get(value.name, "state")
        if role == "data":
            feeds[value.name] = rng.standard_normal(value.shape).astype(np.float32)
        elif role == "labels":
            feeds[value.name] = rng.integers(0, job["classes"], size=value.shape).astype(np.int64)
        elif role == "step":
            feeds[value.name] = np.array(0, np.int64)
        elif role == "lr":
            feeds[value.name] = np.array(1e-4, np.float32)
        elif role == "parameter":
            feeds[value.name] = (0.05 * rng.standard_normal(value.shape)).astype(np.float32)
        else:
            feeds[value.name] = np.zeros(value.shape, np.float32)

    def run() -> str:
        outputs = session.run(None, feeds)
        digest = hashlib.sha256()
        for array in outputs:
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()

    def close() -> None:
        nonlocal session
        if options.enable_profiling:
            session.end_profiling()
        session = None

    return run, close


def _training_build(ort, job: dict, options):
    import numpy as np
    from onnxruntime.training import api

    folder = Path(job["artifacts"])
    state = api.CheckpointState.load_checkpoint(str(folder / "checkpoint"))
    module = api.Module(str(folder / "training_model.onnx"), state, None, device="cpu", session_options=options)
    optimizer = api.Optimizer(str(folder / "optimizer_model.onnx"), module)
    module.train()
    rng = np.random.default_rng(0)
    x = rng.standard_normal(job["data_shape"]).astype(np.float32)
    y = rng.integers(0, job["classes"], size=job["label_shape"]).astype(np.int64)

    def run() -> str:
        outputs = module(x, y)
        optimizer.step()
        module.lazy_reset_grad()
        return hashlib.sha256(np.asarray(outputs[0]).tobytes()).hexdigest()

    def close() -> None:
        nonlocal module, optimizer
        optimizer = module = None  # the session writes its profile when it is destroyed

    return run, close


def _high_water_mib() -> float:
    with open("/proc/self/status") as handle:
        return int(next(line for line in handle if line.startswith("VmHWM:")).split()[1]) / 1024


def _reset_high_water() -> None:
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")


# ---------------------------------------------------------------------------------------------
# The driver: compile, derive the variants, run each in a fresh process, read the order.
# ---------------------------------------------------------------------------------------------


def compile_case(case: Case, folder: Path, save_early_pass: bool = True) -> Path:
    """Export and compile `case` (last 4 convs trained, r = 2, AdamW) into `folder`; without the
    save_early pass when `save_early_pass` is False (the same pipeline, that pass left out)."""
    import torch

    from gfcompile import pipeline
    from gfcompile.config import CompileConfig
    from models import build
    from models.export import export_onnx
    from passes import save_early

    if (folder / "artifacts" / "manifest.json").is_file():  # compiled earlier into the same folder
        return folder / "artifacts"
    torch.manual_seed(0)
    path = export_onnx(build(case.model, num_classes=10), folder / f"{case.model}.onnx", (1, 3, case.size, case.size))
    config = CompileConfig(
        filter_layers=case.filter_layers,
        train_layers=4,
        patch_size=2,
        patch_size_map=dict(case.patch_size_map),
        row_tiles=case.row_tiles,
        batch_size=case.batch,
        output_dir=folder / "artifacts",
    )
    with _training_passes_without(pipeline, None if save_early_pass else save_early):
        return pipeline.compile_model(path, config, report=lambda message: None)


@contextlib.contextmanager
def _training_passes_without(pipeline, left_out) -> Iterator[None]:
    kept = pipeline.TRAINING_PASSES
    if left_out is not None:
        pipeline.TRAINING_PASSES = tuple(p for p in kept if p is not left_out)
    try:
        yield
    finally:
        pipeline.TRAINING_PASSES = kept


def order_barriers(model) -> list:
    """The lowered save_early barriers of a portable train step (see passes/lower_training_ops.py)."""
    from passes.lower_training_ops import ORDERED_ALIAS
    from passes.lowering import LOWERED_SCOPE

    suffix = f"/{LOWERED_SCOPE}/{ORDERED_ALIAS}"
    return [n for n in model.graph.node if n.op_type == "Reshape" and n.name.endswith(suffix)]


def with_identity_barriers(model):
    """`model` with each ordering Reshape replaced by Identity(x) and the nodes only it read dropped."""
    import onnx
    from onnx import helper

    result = onnx.ModelProto()
    result.CopyFrom(model)
    barriers = {n.name for n in order_barriers(result)}
    nodes = [
        helper.make_node("Identity", [n.input[0]], list(n.output), name=n.name) if n.name in barriers else n
        for n in result.graph.node
    ]
    needed = {o.name for o in result.graph.output}
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    del result.graph.node[:]
    result.graph.node.extend(reversed(kept))
    produced = {out for n in kept for out in n.output}
    live = [v for v in result.graph.value_info if v.name in produced]
    del result.graph.value_info[:]
    result.graph.value_info.extend(live)
    return result


def summary_chains(training_model) -> dict[str, list[str]]:
    """Each summary save_early tied to the forward -> the names of the nodes that compute it from
    its full-resolution source (read off the training graph's PassThrough barriers)."""
    produced_by = {out: node for node in training_model.graph.node for out in node.output}
    chains: dict[str, list[str]] = {}
    for barrier in training_model.graph.node:
        if barrier.op_type != "PassThrough":
            continue
        source, *summaries = barrier.input
        for summary in summaries:
            names, frontier = [], [summary]
            while frontier:
                tensor = frontier.pop()
                node = produced_by.get(tensor)
                if tensor == source or node is None or node.name in names:
                    continue
                names.append(node.name)
                frontier.extend(node.input)
            chains[summary] = names
    return chains


def backward_node_names(model) -> set[str]:
    """The nodes that (transitively) read a gradient tensor, by data as passes/graph_utils does."""
    from passes.names import GRADIENT_SUFFIX

    readers: dict[str, list] = {}
    for node in model.graph.node:
        for tensor in node.input:
            readers.setdefault(tensor, []).append(node)
    tensors = {t for n in model.graph.node for t in (*n.input, *n.output)} | {i.name for i in model.graph.initializer}
    frontier = [t for t in tensors if t.endswith(GRADIENT_SUFFIX)]
    seen, backward = set(frontier), set()
    while frontier:
        for node in readers.get(frontier.pop(), []):
            if node.name not in backward:
                backward.add(node.name)
                fresh = [out for out in node.output if out not in seen]
                seen.update(fresh)
                frontier.extend(fresh)
    return backward


def summaries_in_forward(order: list[str], chains: dict[str, list[str]], backward: set[str]) -> tuple[int, int]:
    """(how many summaries had every node of their chain run before the first backward node, how
    many had a node in the profile at all)."""
    # ORT's NCHWc transformer renames the nodes it converts to "<name>_nchwc".
    position = {name.removesuffix(NCHWC_SUFFIX): index for index, name in enumerate(order)}
    first_backward = min((position[name] for name in backward if name in position), default=None)
    if first_backward is None:
        raise ValueError("no backward node is in the profiled order")
    done = found = 0
    for names in chains.values():
        ran = [position[name] for name in names if name in position]
        if ran:
            found += 1
            done += max(ran) < first_backward
    return done, found


def _run_job(python: str, job: dict) -> dict:
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); from benchmarks.portable_order import measure; "
        f"print(json.dumps(measure(json.loads(sys.argv[1]))))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env.update(MEMORY_ENV)
    result = subprocess.run([python, "-I", "-c", code, json.dumps(job)], capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"benchmarks.portable_order: error: {job['model']} failed: {result.stderr.strip()[-800:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _jobs(artifacts: Path, steps: int, scratch: Path) -> dict:
    manifest = json.loads((artifacts / "manifest.json").read_text())
    portable = manifest["portable"]
    roles = {name: "data" for name in portable["data_inputs"]}
    roles[portable["label_input"]] = "labels"
    roles[portable["step_input"]] = "step"
    roles[portable["lr_input"]] = "lr"
    roles.update({p["input"]: "parameter" for p in portable["parameters"]})
    common = {
        "artifacts": str(artifacts),
        "options": manifest["session_options"],
        "steps": steps,
        "classes": manifest["outputs"][0]["shape"][1],
        "roles": roles,
        "data_shape": manifest["inputs"][0]["shape"],
        "label_shape": manifest["labels"][0]["shape"],
    }
    scratch.mkdir(parents=True, exist_ok=True)
    return {"common": common, "portable": portable, "scratch": scratch}


def run_case(case: Case, steps: int, portable_python: str, folder: Path, log=print) -> dict:
    import onnx

    ordered = compile_case(case, folder / "ordered")
    plain = compile_case(case, folder / "no_save_early", save_early_pass=False)
    training_model = onnx.load(str(ordered / "training_model.onnx"), load_external_data=False)
    chains = summary_chains(training_model)
    step = onnx.load(str(ordered / "train_step.onnx"), load_external_data=False)
    onnx.save(with_identity_barriers(step), str(ordered / IDENTITY_STEP))

    row = {"case": case.label, "summaries": len(chains), "barriers": len(order_barriers(step)), "runs": {}}
    interpreters = {"1.19": sys.executable, "newest": portable_python}
    variants = [("training build", ordered, "training_model.onnx", "training", {"1.19": sys.executable})]
    variants += [
        ("portable, ordered", ordered, "train_step.onnx", "portable", interpreters),
        ("portable, Identity", ordered, IDENTITY_STEP, "portable", interpreters),
        ("portable, no save_early", plain, "train_step.onnx", "portable", interpreters),
    ]
    for label, artifacts, model_file, kind, pythons in variants:
        info = _jobs(artifacts, steps, folder / "profiles")
        model = onnx.load(str(artifacts / model_file), load_external_data=False)
        backward = backward_node_names(model)
        for tag, python in pythons.items():
            prefix = info["scratch"] / f"{label.replace(' ', '_').replace(',', '')}_{tag}"
            job = {**info["common"], "kind": kind, "model": str(artifacts / model_file), "profile_prefix": str(prefix)}
            result = _run_job(python, job)
            done, found = summaries_in_forward(result.pop("order"), chains, backward)
            result.update(in_forward=done, found=found)
            row["runs"][f"{label} @ {tag}"] = result
            log(
                f"{case.label} | {label} on ORT {result['onnxruntime']}: peak {result['peak_mib']:.0f} MiB, "
                f"steps {result['step_peak_mib']:.0f} MiB, {result['step_ms']:.0f} ms, summaries in forward "
                f"{done}/{found} of {len(chains)} (load {result['loadavg']:.1f})"
            )
    for tag in interpreters:
        ordered_digest = row["runs"][f"portable, ordered @ {tag}"]["digest"]
        row[f"bitwise_equal_identity_{tag}"] = ordered_digest == row["runs"][f"portable, Identity @ {tag}"]["digest"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = [
        "| case | ORT | build | summaries in forward | peak MiB | step peak MiB | step ms |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for key, run in row["runs"].items():
            label = key.split(" @ ")[0]
            lines.append(
                f"| {row['case']} | {run['onnxruntime']} | {label} | {run['in_forward']}/{run['found']} | "
                f"{run['peak_mib']:.0f} | {run['step_peak_mib']:.0f} | {run['step_ms']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.portable_order", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["deeplab", "mobilenet_v2", "resnet18"])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--portable-python", default=sys.executable, help="interpreter with the newest onnxruntime")
    parser.add_argument("-o", "--output", type=Path, default=Path("bench_results/portable_order.json"))
    parser.add_argument(
        "--work-dir", type=Path, help="keep the compiled artifacts here and reuse them (default: a temporary folder)"
    )
    parser.add_argument("--compile-only", action="store_true", help="compile the cases into --work-dir and stop")
    args = parser.parse_args(argv)
    if args.compile_only and args.work_dir is None:
        parser.error("--compile-only needs --work-dir")
    rows = []
    for name in args.cases:
        with contextlib.ExitStack() as stack:
            folder = args.work_dir / name if args.work_dir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
            if args.compile_only:
                compile_case(CASES[name], folder / "ordered")
                compile_case(CASES[name], folder / "no_save_early", save_early_pass=False)
                continue
            rows.append(run_case(CASES[name], args.steps, args.portable_python, folder))
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(rows, indent=2) + "\n")
        args.output.with_suffix(".md").write_text(markdown(rows))
    if rows:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Suite `accuracy`: fine-tuning accuracy of exact BP, gradient filtering and row tiling on a real transfer task.

The task is the repository's own: `models/zoo/mobilenetv2_digits.onnx` (MobileNetV2 x0.5,
pretrained on scikit-learn's digits 0-4 at 64x64, see `models/pretrain_digits.py`) is
fine-tuned on digits 5-9 (`models/data/digits_5to9_train.npz`, 671 images) and evaluated on
the held-out `digits_5to9_test.npz` (225 images), which it has never seen. Every variant trains
the last N convs plus the head (and the BN affine parameters between them), compiled with
`gfcompile.pipeline.compile_model` and trained with the torch-free `runtime.trainer.Trainer`
(AdamW, the demo's learning rate, batch 32), each (variant, seed) in its own worker process.

The initial weights are the pretrained ones for every run, so a seed changes only the data
order (`runtime.data.batches`: batch k depends on (seed, k)); all variants see the same batches
for the same seed. Row tiling reorders the forward into bands but computes the same values, so
a row-tiled run must reproduce its untiled twin to the last digit: the suite compares their test
accuracy per seed, their loss curves and their trained parameters.

At the model's own 64x64 input the last 16 convs see 2x2 maps, so r = 4 cannot be planned
there; a second group feeds the same pretrained model the same digits upscaled 2x (nearest) to
128x128, where the last 4 convs see 4x4 maps and r = 2 and r = 4 both fit, with its own exact
baseline.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, SuiteContext, SuiteResult, fmt, md_table, run_worker

SOURCE = REPO_ROOT / "models" / "zoo" / "mobilenetv2_digits.onnx"
DATA_DIR = REPO_ROOT / "models" / "data"
NATIVE_SIZE = 64  # what the bundled model was pretrained at
BATCH = 32
LR = 0.003  # the demo's (Makefile `demo`)
TRAIN_LAYERS = 4
ROW_TILES = 8
# The final training loss is the mean of the last few steps' batch losses (one batch is noisy).
LOSS_WINDOW = 10


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    filter_layers: int  # 0: exact backprop of the TRAIN_LAYERS convs
    patch_size: int = 2
    row_tiles: int = 0
    equal_to: str | None = None  # the untiled variant whose results this one must reproduce exactly

    def compile_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "filter_layers": self.filter_layers,
            "train_layers": TRAIN_LAYERS,
            "patch_size": self.patch_size,
        }
        if self.row_tiles:
            # The trained chain too: the row_recompute pass then keeps only band boundaries alive.
            kwargs.update(row_tiles=self.row_tiles, row_tile_trainable=True)
        return kwargs


VARIANTS = {
    variant.key: variant
    for variant in (
        Variant("exact", "exact BP", 0),
        Variant("r2", "filtered r=2", TRAIN_LAYERS, 2),
        Variant("r4", "filtered r=4", TRAIN_LAYERS, 4),
        Variant("tiled", f"row tiling K={ROW_TILES}", 0, row_tiles=ROW_TILES, equal_to="exact"),
        Variant("tiled_r2", f"row tiling K={ROW_TILES} + filtered r=2", TRAIN_LAYERS, 2, ROW_TILES, equal_to="r2"),
    )
}


@dataclass(frozen=True)
class Group:
    size: int  # input height = width; NATIVE_SIZE, or the digits upscaled by an integer factor
    variants: tuple[str, ...]


@dataclass(frozen=True)
class AccuracySettings:
    groups: tuple[Group, ...]
    seeds: tuple[int, ...]
    steps: int


SETTINGS = {
    # A smoke test (about 30 s on 2 cores): compiles, training, evaluation and both tiled twins' comparisons.
    "quick": AccuracySettings(groups=(Group(64, ("exact", "r2", "tiled", "tiled_r2")),), seeds=(0,), steps=6),
    # 200 steps of batch 32 is about 9.5 epochs of the 671 training images; about 12 minutes on 2 cores.
    "full": AccuracySettings(
        groups=(Group(64, ("exact", "r2", "tiled", "tiled_r2")), Group(128, ("exact", "r2", "r4"))),
        seeds=(0, 1, 2),
        steps=200,
    ),
}


# --------------------------------------------------------------------------------------
# Parent: task files, compiles, runs, comparisons
# --------------------------------------------------------------------------------------


def run(ctx: SuiteContext) -> SuiteResult:
    settings = SETTINGS[ctx.profile]
    groups = []
    # Trained parameters go to files here; they are compared once every run of a group is done.
    with tempfile.TemporaryDirectory(prefix="gfbench-accuracy-") as tmp:
        for group in settings.groups:
            groups.append(_run_group(ctx, settings, group, Path(tmp)))
    data = {
        "settings": {**asdict(settings), "batch": BATCH, "lr": LR, "train_layers": TRAIN_LAYERS},
        "task": {
            "source": str(SOURCE.relative_to(REPO_ROOT)),
            "train": "models/data/digits_5to9_train.npz",
            "test": "models/data/digits_5to9_test.npz",
        },
        "threads": ctx.threads,
        "variants": {key: asdict(variant) for key, variant in VARIANTS.items()},
        "groups": groups,
    }
    return SuiteResult(data=data, markdown=_markdown(data), plot=lambda path: _plot(data, path))


def _run_group(ctx: SuiteContext, settings: AccuracySettings, group: Group, tmp: Path) -> dict[str, Any]:
    source, train, test = task_files(ctx, group.size)
    artifacts = {key: compile_variant(ctx, group.size, VARIANTS[key], source) for key in group.variants}
    compiled = {key: _describe_artifacts(path) for key, path in artifacts.items()}
    trainable = {tuple(info["trainable_params"]) for info in compiled.values()}
    if len(trainable) != 1:
        raise RuntimeError(f"{group.size}²: the variants train different parameters: {trainable}")
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in group.variants}
    # Seed-major order: load from other processes on the machine hits every variant alike.
    for seed in settings.seeds:
        for key in group.variants:
            params = {
                "artifacts": str(artifacts[key]),
                "train": str(train),
                "test": str(test),
                "steps": settings.steps,
                "seed": seed,
                "threads": ctx.threads,
                "params_out": str(tmp / f"{group.size}_{key}_s{seed}.npz"),
            }
            result = run_worker("accuracy_train", params)
            runs[key].append(result)
            ctx.log(
                f"accuracy: {group.size}² {key} seed {seed}: test accuracy {result['test_accuracy']:.4f}, "
                f"final loss {result['final_train_loss']:.4f} ({result['train_s']:.1f} s)"
            )
    summaries = {key: summarise(key_runs) for key, key_runs in runs.items()}
    checks = {
        key: compare_runs(runs[key], runs[VARIANTS[key].equal_to])
        for key in group.variants
        if VARIANTS[key].equal_to in runs
    }
    return {
        "size": group.size,
        "upscale": group.size // NATIVE_SIZE,
        "variants": list(group.variants),
        "compiled": compiled,
        "summaries": summaries,
        "exactness": checks,
        "runs": runs,
    }


def task_files(ctx: SuiteContext, size: int) -> tuple[Path, Path, Path]:
    """The model and the train/test data at `size`x`size`: the bundled files, or 2x (4x, ...) upscaled copies.

    The ONNX graph ends in GlobalAveragePool + Flatten, so the same weights run at any multiple of the
    pretraining size; only the input's H and W are changed (gfcompile re-infers every shape).
    """
    train, test = DATA_DIR / "digits_5to9_train.npz", DATA_DIR / "digits_5to9_test.npz"
    if size == NATIVE_SIZE:
        return SOURCE, train, test
    if size % NATIVE_SIZE:
        raise ValueError(f"accuracy: input size {size} is not a multiple of {NATIVE_SIZE}")
    import numpy as np
    import onnx

    factor = size // NATIVE_SIZE
    folder = ctx.cache_dir / "accuracy"
    folder.mkdir(parents=True, exist_ok=True)
    model = onnx.load(SOURCE)
    for dim in model.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.Clear()
        dim.dim_value = size
    del model.graph.value_info[:]
    source = folder / f"mobilenetv2_digits_{size}.onnx"
    _write_atomic(source, onnx.save, model)
    paths = []
    for original in (train, test):
        with np.load(original) as archive:
            # Nearest-neighbour upscaling keeps the uint8 images and the recorded preprocessing valid.
            x = archive["x"].repeat(factor, axis=2).repeat(factor, axis=3)
            y = archive["y"]
        path = folder / f"{original.stem}_{size}.npz"
        _write_atomic(path, lambda arrays, target: np.savez(target, **arrays), {"x": x, "y": y})
        paths.append(path)
    return source, paths[0], paths[1]


def _write_atomic(path: Path, writer, value) -> None:
    # A cache file that exists is complete: a killed run must not leave half an .onnx or .npz behind.
    temporary = path.with_name(path.stem + ".tmp" + path.suffix)
    writer(value, str(temporary))
    temporary.replace(path)


def compile_variant(ctx: SuiteContext, size: int, variant: Variant, source: Path) -> Path:
    """Compile one variant into the cache, unless a build from the same model, config and compiler exists."""
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from runtime.trainer import sha256_file

    from .training import _compiler_fingerprint

    out = ctx.cache_dir / "accuracy" / f"mobilenetv2_digits_{size}_b{BATCH}_{variant.key}"
    stamp = out.with_name(out.name + ".stamp.json")
    kwargs = variant.compile_kwargs()
    expected = {
        "source_sha256": sha256_file(source),
        "compiler": _compiler_fingerprint(),
        "batch": BATCH,
        "lr": LR,
        **kwargs,
    }
    cached = ctx.use_cache and stamp.is_file() and (out / "manifest.json").is_file()
    if cached and json.loads(stamp.read_text()) == expected:
        return out
    started = time.perf_counter()
    config = CompileConfig(batch_size=BATCH, lr=LR, output_dir=out, force=True, **kwargs)
    compile_model(source, config, report=lambda message: None)
    stamp.write_text(json.dumps(expected, indent=2) + "\n")
    ctx.log(f"compiled accuracy {size}² {variant.key} in {time.perf_counter() - started:.1f} s -> {out}")
    return out


def _describe_artifacts(path: Path) -> dict[str, Any]:
    """What the plan did, and the graph's conv count: a tiled build has more convs (one per band)."""
    import onnx

    manifest = json.loads((path / "manifest.json").read_text())
    graph = onnx.load(path / "training_model.onnx", load_external_data=False).graph
    return {
        "trainable_params": manifest["plan"]["trainable_params"],
        "filtered": manifest["plan"]["filtered"],
        "row_tiles": manifest["plan"]["row_tiles"],
        "row_tile_trainable": manifest["plan"]["row_tile_trainable"],
        "training_conv_nodes": sum(node.op_type == "Conv" for node in graph.node),
        "training_passes": manifest["passes"]["training"],
    }


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    # Sample standard deviation over seeds; undefined for a single seed.
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over seeds of test accuracy, test loss and final training loss."""
    summary: dict[str, Any] = {"seeds": [run["seed"] for run in runs]}
    for key in ("test_accuracy", "test_loss", "final_train_loss", "test_accuracy_before", "train_s"):
        mean, std = _mean_std([run[key] for run in runs])
        summary[key] = {"mean": mean, "std": std, "per_seed": [run[key] for run in runs]}
    return summary


def compare_runs(tiled: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, Any]:
    """Per seed: same test accuracy?, largest loss difference over all steps, largest parameter difference."""
    import numpy as np

    per_seed = []
    for run, ref in zip(tiled, reference, strict=True):
        if run["seed"] != ref["seed"]:
            raise RuntimeError(f"accuracy: comparing seed {run['seed']} with seed {ref['seed']}")
        with np.load(run["params_out"]) as a, np.load(ref["params_out"]) as b:
            if sorted(a.files) != sorted(b.files):
                raise RuntimeError("accuracy: a row-tiled run trained different parameters than its untiled twin")
            param_diff = max(float(np.max(np.abs(a[name] - b[name]))) for name in a.files)
            tensors = len(a.files)
        per_seed.append(
            {
                "seed": run["seed"],
                "accuracy": run["test_accuracy"],
                "reference_accuracy": ref["test_accuracy"],
                "accuracy_equal": run["test_accuracy"] == ref["test_accuracy"],
                "test_loss_diff": abs(run["test_loss"] - ref["test_loss"]),
                "max_train_loss_diff": float(np.max(np.abs(np.subtract(run["losses"], ref["losses"])))),
                "max_param_diff": param_diff,
                "param_tensors": tensors,
            }
        )
    return {
        "accuracy_equal_every_seed": all(entry["accuracy_equal"] for entry in per_seed),
        "max_param_diff": max(entry["max_param_diff"] for entry in per_seed),
        "max_train_loss_diff": max(entry["max_train_loss_diff"] for entry in per_seed),
        "max_test_loss_diff": max(entry["test_loss_diff"] for entry in per_seed),
        "per_seed": per_seed,
    }


# --------------------------------------------------------------------------------------
# Worker: one (variant, seed)
# --------------------------------------------------------------------------------------


def train_task(params: dict) -> dict[str, Any]:
    """Fine-tune compiled artifacts for `steps` steps from the pretrained weights; evaluate before and after."""
    import numpy as np

    from runtime.data import load_data

    from .training import open_trainer

    trainer = open_trainer(Path(params["artifacts"]), params["threads"])
    train = load_data(Path(params["train"]), trainer.manifest)
    test = load_data(Path(params["test"]), trainer.manifest)
    before = trainer.evaluate(test)
    started = time.perf_counter()
    losses = trainer.fit(train, params["steps"], seed=params["seed"], log_every=0)
    train_s = time.perf_counter() - started
    after = trainer.evaluate(test)
    parameters = trainer.state.parameters
    np.savez(params["params_out"], **{name: parameters[name].data for name in trainer.trainable})
    return {
        "seed": params["seed"],
        "steps": len(losses),
        "losses": losses,
        "final_train_loss": float(np.mean(losses[-LOSS_WINDOW:])),
        "test_accuracy": after.accuracy,
        "test_loss": after.loss,
        "test_samples": after.samples,
        "test_accuracy_before": before.accuracy,
        "test_loss_before": before.loss,
        "train_s": train_s,
        "params_out": params["params_out"],
    }


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _pm(stat: dict[str, Any], scale: float = 1.0, digits: int = 2) -> str:
    mean = fmt(stat["mean"] * scale, digits)
    return mean if stat["std"] is None else f"{mean} ± {fmt(stat['std'] * scale, digits)}"


def _markdown(data: dict[str, Any]) -> str:
    settings = data["settings"]
    seeds = settings["seeds"]
    headers = [
        "input",
        "variant",
        "test accuracy %",
        "Δ vs exact (points)",
        "test loss",
        "final train loss",
        "per-seed accuracy %",
        "train s",
    ]
    rows = []
    for group in data["groups"]:
        exact = group["summaries"].get("exact")
        for key in group["variants"]:
            summary = group["summaries"][key]
            delta = (summary["test_accuracy"]["mean"] - exact["test_accuracy"]["mean"]) * 100 if exact else None
            rows.append(
                [
                    f"{group['size']}²" + (f" ({group['upscale']}x up)" if group["upscale"] > 1 else ""),
                    data["variants"][key]["label"],
                    _pm(summary["test_accuracy"], 100),
                    "—" if delta is None or key == "exact" else f"{delta:+.2f}",
                    _pm(summary["test_loss"], digits=3),
                    _pm(summary["final_train_loss"], digits=3),
                    ", ".join(f"{value * 100:.2f}" for value in summary["test_accuracy"]["per_seed"]),
                    _pm(summary["train_s"], digits=1),
                ]
            )
    check_rows = []
    for group in data["groups"]:
        for key, check in group["exactness"].items():
            reference = data["variants"][key]["equal_to"]
            check_rows.append(
                [
                    f"{group['size']}²",
                    f"{data['variants'][key]['label']} vs {data['variants'][reference]['label']}",
                    "yes" if check["accuracy_equal_every_seed"] else "**NO**",
                    f"{check['max_param_diff']:.3g}",
                    f"{check['max_train_loss_diff']:.3g}",
                    f"{check['max_test_loss_diff']:.3g}",
                    f"{group['compiled'][key]['training_conv_nodes']} vs "
                    f"{group['compiled'][reference]['training_conv_nodes']}",
                ]
            )
    before = {
        group["size"]: group["summaries"][group["variants"][0]]["test_accuracy_before"]["mean"]
        for group in data["groups"]
    }
    parts = [
        f"Fine-tuning `{data['task']['source']}` (MobileNetV2 x0.5 pretrained on digits 0-4) on digits 5-9 "
        f"({data['task']['train']}), evaluated on the held-out {data['task']['test']} (225 images). "
        f"Last {settings['train_layers']} convs + head trained, AdamW lr {settings['lr']}, batch {settings['batch']}, "
        f"{settings['steps']} steps, BN in eval mode, seeds {', '.join(map(str, seeds))} "
        "(the seed sets the data order; every run starts from the same pretrained weights). "
        "Mean ± sample standard deviation over seeds. "
        + "Test accuracy before fine-tuning: "
        + ", ".join(f"{size}² {value * 100:.2f}%" for size, value in before.items())
        + ". Final train loss = mean batch loss of the last "
        f"{LOSS_WINDOW} steps. 'train s' is the wall time of the training loop, for orientation only: it is not "
        "a timing benchmark (see `step`) and follows the machine's load. At 64² the last 4 convs see 2x2 maps, "
        "so r = 4 does not fit; the 128² group runs the same model on the same digits upscaled 2x (nearest), "
        "where they see 4x4 maps.",
        "",
        md_table(headers, rows, numeric_from=2, text_columns=(6,)),
        "",
        "Row tiling vs its untiled twin (same seeds, same data order): test accuracy equal on every seed, largest "
        "absolute difference of any trained parameter after training, of the batch loss at any step, and of the test "
        "loss; and the Conv nodes in each training graph (a tiled graph runs one conv per band).",
        "",
        md_table(
            [
                "input",
                "pair",
                "accuracy equal (every seed)",
                "max abs Δ param",
                "max abs Δ train loss",
                "max abs Δ test loss",
                "Conv nodes",
            ],
            check_rows,
            numeric_from=2,
            text_columns=(2, 6),
        )
        if check_rows
        else "(no row-tiled variant in this profile)",
    ]
    return "\n".join(parts)


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    groups = data["groups"]
    fig, axes = plt.subplots(1, 1 + len(groups), figsize=(5 + 4.5 * len(groups), 4.2))
    labels, means, stds = [], [], []
    for group in groups:
        for key in group["variants"]:
            stat = group["summaries"][key]["test_accuracy"]
            labels.append(f"{group['size']}² {data['variants'][key]['label']}")
            means.append(stat["mean"] * 100)
            stds.append((stat["std"] or 0.0) * 100)
    axes[0].barh(np.arange(len(labels)), means, xerr=stds, color="tab:blue")
    axes[0].set_yticks(np.arange(len(labels)), labels, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("test accuracy on digits 5-9, %")
    axes[0].set_xlim(0, 100)
    for ax, group in zip(axes[1:], groups, strict=True):
        for key in group["variants"]:
            curves = np.array([run["losses"] for run in group["runs"][key]])
            style = "--" if data["variants"][key]["equal_to"] else "-"
            ax.plot(np.arange(1, curves.shape[1] + 1), curves.mean(axis=0), style, label=data["variants"][key]["label"])
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("batch loss (mean over seeds)")
        ax.set_title(f"{group['size']}²", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

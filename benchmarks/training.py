"""Whole training steps, shared by the `memory` and `step` suites.

Parent side: the configurations, exporting zoo models, compiling (and caching) their
artifacts with `gfcompile.pipeline.compile_model`. Worker side: one process runs one
configuration, either compiled artifacts through `runtime.trainer.Trainer` (ORT) or a
PyTorch eager baseline, and measures memory or step time.

Variants, all training the last 4 convs plus the head (and the BN affine parameters in
between) with AdamW, cross-entropy (per pixel for the segmentation net), BN in eval mode:
  torch_exact         (a) eager autograd; only the trained parameters require grad
  torch_filtered      (b) eager with tests/reference/gradient_filter_torch.py's autograd function
  torch_checkpoint    (c) eager with torch.utils.checkpoint around each trained block
  ort_exact           (d) gfcompile --filter-layers 0 --train-layers 4 (ORT's ConvGrad backward)
  ort_filtered        (e) gfcompile --filter-layers 4 (r = 2)
  ort_tiled           (f) (d) with --row-tiles 8: the frozen prefix runs in 8 row bands
  ort_tiled_filtered  (g) (e) with --row-tiles 8
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .common import (
    REPO_ROOT,
    SuiteContext,
    current_rss_bytes,
    peak_rss_bytes,
    repeat_timed,
    reset_peak_rss,
    run_worker,
    timing_stats,
)

MODELS = ("mobilenet_v2", "resnet18")
SEGMENTATION_MODEL = "deeplabv3_resnet18"
NUM_CLASSES = 10  # a fine-tuning head (CIFAR-10-like), as in the paper's classification runs; per pixel for DeepLab
TRAIN_LAYERS = 4
PATCH_SIZE = 2
ROW_TILES = 8
SEED = 0
# DeepLab's ASPP image-pooling conv sees a 1x1 map: only r = 1 fits it (where filtering is exact).
PATCH_SIZE_MAPS = {SEGMENTATION_MODEL: {"classifier.0.convs.4.1.weight": 1}}
# What each ORT variant changes in the CompileConfig (the rest is shared, see compile_variant).
ORT_VARIANTS: dict[str, dict[str, int]] = {
    "ort_exact": {"filter_layers": 0, "row_tiles": 0},
    "ort_filtered": {"filter_layers": TRAIN_LAYERS, "row_tiles": 0},
    "ort_tiled": {"filter_layers": 0, "row_tiles": ROW_TILES},
    "ort_tiled_filtered": {"filter_layers": TRAIN_LAYERS, "row_tiles": ROW_TILES},
}
BASELINES = ("torch_exact", "ort_exact")  # every ratio is against these two, so they always run
VARIANTS = (
    "torch_exact",
    "torch_filtered",
    "torch_checkpoint",
    "ort_exact",
    "ort_filtered",
    "ort_tiled",
    "ort_tiled_filtered",
)
VARIANT_LABELS = {
    "torch_exact": "torch eager exact (a)",
    "torch_filtered": f"torch eager filtered r={PATCH_SIZE} (b)",
    "torch_checkpoint": "torch checkpoint (c)",
    "ort_exact": "ORT exact (d)",
    "ort_filtered": f"ORT filtered r={PATCH_SIZE} (e)",
    "ort_tiled": f"ORT row tiling K={ROW_TILES} (f)",
    "ort_tiled_filtered": f"ORT tiling K={ROW_TILES} + filtered r={PATCH_SIZE} (g)",
}
# glibc's default mmap threshold moves up (to 32 MiB) after the first big free, after which
# freed tensors stay in the heap and the RSS peak depends on fragmentation. A fixed threshold
# makes every big tensor its own mapping, so RSS follows live tensor bytes (memory suite only:
# the extra page faults would distort step times).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


@dataclass(frozen=True)
class TrainConfig:
    model: str
    size: int
    batch: int

    @property
    def label(self) -> str:
        return f"{self.model} {self.size}² b{self.batch}"

    @property
    def segmentation(self) -> bool:
        return self.model == SEGMENTATION_MODEL


@dataclass(frozen=True)
class TrainSettings:
    configs: tuple[TrainConfig, ...]
    warmup: int
    min_reps: int
    min_time_s: float
    max_reps: int


SETTINGS = {
    "quick": TrainSettings(
        configs=tuple(TrainConfig(m, 112, 4) for m in MODELS), warmup=1, min_reps=3, min_time_s=0.2, max_reps=10
    ),
    # DeepLab at 512² runs at batch 8 only: one step of it (output stride 8) is ~100x MobileNetV2's at 224².
    "full": TrainSettings(
        configs=tuple(TrainConfig(m, 224, b) for m in (*MODELS, "mcunet") for b in (8, 32))
        + (TrainConfig(SEGMENTATION_MODEL, 512, 8),),
        warmup=2,
        min_reps=5,
        min_time_s=5.0,
        max_reps=30,
    ),
}


# --------------------------------------------------------------------------------------
# Parent: export, compile, cache
# --------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Compiled artifacts of one configuration and what the torch baselines need to match them."""

    config: TrainConfig
    artifacts: dict[str, Path]  # ORT variant -> artifacts folder (arena as compiled: on, off when tiled)
    arena_off: dict[str, Path]  # the same with manifest session_options.enable_cpu_mem_arena = False
    trainable_params: list[str]
    trained_modules: list[str]  # torch module names of the trained convs, first to last
    analytic: dict[str, dict[str, int]]  # manifest["layers"]["totals"] per ORT variant (batch 1)
    compiler: dict[str, Any]  # what built the artifacts: source fingerprint and the training passes


def _compiler_fingerprint() -> str:
    """Hash of the compiler's sources: cached artifacts are rebuilt when gfcompile or a pass changes."""
    digest = hashlib.sha256()
    for folder in ("gfcompile", "passes"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            digest.update(path.relative_to(REPO_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def export_model(ctx: SuiteContext, model: str, size: int) -> Path:
    """The zoo model (seed 0, NUM_CLASSES) exported at size x size with a dynamic batch; cached."""
    path = ctx.cache_dir / "onnx" / f"{model}_{size}_c{NUM_CLASSES}_s{SEED}.onnx"
    if ctx.use_cache and path.is_file():
        return path
    import torch

    from models import build
    from models.export import export_onnx

    torch.manual_seed(SEED)
    net = build(model, num_classes=NUM_CLASSES)
    tmp = path.with_suffix(".tmp.onnx")
    export_onnx(net, tmp, input_shape=(1, 3, size, size), metadata={"zoo_name": model, "benchmark_seed": str(SEED)})
    tmp.replace(path)  # a half-written export must never look cached
    return path


def compile_variant(ctx: SuiteContext, config: TrainConfig, variant: str, onnx_path: Path) -> Path:
    """Compile ORT `variant` of `config` into the cache, unless a matching build exists."""
    from gfcompile.config import CompileConfig
    from gfcompile.pipeline import compile_model
    from runtime.trainer import sha256_file

    out = ctx.cache_dir / "artifacts" / f"{config.model}_{config.size}_b{config.batch}_{variant}"
    stamp = out.with_name(out.name + ".stamp.json")
    filter_layers = ORT_VARIANTS[variant]["filter_layers"]
    expected = {
        "source_sha256": sha256_file(onnx_path),
        "compiler": _compiler_fingerprint(),
        "filter_layers": filter_layers,
        "train_layers": TRAIN_LAYERS,
        "patch_size": PATCH_SIZE,
        "patch_size_map": PATCH_SIZE_MAPS.get(config.model, {}) if filter_layers else {},
        "row_tiles": ORT_VARIANTS[variant]["row_tiles"],
        "batch": config.batch,
    }
    cached = ctx.use_cache and stamp.is_file() and (out / "manifest.json").is_file()
    if cached and json.loads(stamp.read_text()) == expected:
        return out
    compile_config = CompileConfig(
        filter_layers=filter_layers,
        train_layers=TRAIN_LAYERS,
        patch_size=PATCH_SIZE,
        patch_size_map=dict(expected["patch_size_map"]),
        row_tiles=expected["row_tiles"],
        batch_size=config.batch,
        output_dir=out,
        force=True,
    )
    started = time.perf_counter()
    compile_model(onnx_path, compile_config, report=lambda message: None)
    stamp.write_text(json.dumps(expected, indent=2) + "\n")
    ctx.log(f"compiled {config.label} {variant} in {time.perf_counter() - started:.1f} s -> {out}")
    return out


def arena_off_copy(artifacts: Path) -> Path:
    """A copy of the artifacts whose manifest asks ORT for no CPU memory arena.

    With the arena on, ORT keeps freed blocks for reuse, so the process peak would show the
    arena's growth policy rather than the activations a step keeps alive.
    """
    target = artifacts.with_name(artifacts.name + "_noarena")
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(artifacts, target)
    manifest_path = target / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["session_options"]["enable_cpu_mem_arena"] = False
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
    return target


def selected_variants(ctx: SuiteContext) -> tuple[str, ...]:
    """The variants `--variants` asks for (all by default), plus the two baselines every ratio needs."""
    unknown = set(ctx.variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    wanted = set(ctx.variants or VARIANTS) | set(BASELINES)
    return tuple(variant for variant in VARIANTS if variant in wanted)


def selected_configs(ctx: SuiteContext, settings: TrainSettings) -> tuple[TrainConfig, ...]:
    """The profile's configurations, restricted to `--models` when given."""
    known = {config.model for config in settings.configs}
    unknown = set(ctx.models) - known
    if unknown:
        raise ValueError(f"models {sorted(unknown)} are not in this profile ({', '.join(sorted(known))})")
    return tuple(config for config in settings.configs if not ctx.models or config.model in ctx.models)


def prepare(ctx: SuiteContext, config: TrainConfig, arena_off: bool) -> Prepared:
    onnx_path = export_model(ctx, config.model, config.size)
    ort_variants = [variant for variant in selected_variants(ctx) if variant in ORT_VARIANTS]
    artifacts = {variant: compile_variant(ctx, config, variant, onnx_path) for variant in ort_variants}
    manifests = {v: json.loads((path / "manifest.json").read_text()) for v, path in artifacts.items()}
    exact = manifests["ort_exact"]
    for variant, manifest in manifests.items():
        # Every ORT variant must train the same tensors and apply what its name says, or ratios mean nothing.
        plan = manifest["plan"]
        if plan["trainable_params"] != exact["plan"]["trainable_params"]:
            raise RuntimeError(f"{config.label}: {variant} trains different parameters than ort_exact")
        expected_filtered = ORT_VARIANTS[variant]["filter_layers"]
        if len(plan["filtered"]) != expected_filtered:
            raise RuntimeError(f"{config.label}: {variant}: expected {expected_filtered} filtered convs, got {plan}")
        if (plan["row_tiles"] or 0) != ORT_VARIANTS[variant]["row_tiles"]:
            raise RuntimeError(f"{config.label}: {variant}: expected row_tiles {ORT_VARIANTS[variant]['row_tiles']}")
    return Prepared(
        config=config,
        artifacts=artifacts,
        arena_off={v: arena_off_copy(path) for v, path in artifacts.items()} if arena_off else {},
        trainable_params=list(exact["plan"]["trainable_params"]),
        trained_modules=[row["weight"].rsplit(".", 1)[0] for row in exact["layers"]["rows"]],
        analytic={v: m["layers"]["totals"] for v, m in manifests.items()},
        compiler={
            # Other work on gfcompile/ and passes/ changes the artifacts: record which build was measured.
            "fingerprint": _compiler_fingerprint(),
            "training_passes": exact["passes"]["training"],
            "forward_passes": exact["passes"]["forward"],
            "session_options": {v: m["session_options"] for v, m in manifests.items()},
            "patch_size_map": PATCH_SIZE_MAPS.get(config.model, {}),
        },
    )


def run_variants(
    ctx: SuiteContext, prepared: Prepared, mode: str, settings: TrainSettings
) -> dict[str, list[dict[str, Any]]]:
    """Every variant of one configuration, `ctx.repeat` fresh processes each; variant -> list of runs."""
    config = prepared.config
    common = {
        "mode": mode,
        "batch": config.batch,
        "input_shape": [3, config.size, config.size],
        "label_shape": [config.size, config.size] if config.segmentation else [],
        "num_classes": NUM_CLASSES,
        "threads": ctx.threads,
        "seed": SEED,
        "warmup": settings.warmup,
        "min_reps": settings.min_reps,
        "min_time_s": settings.min_time_s,
        "max_reps": settings.max_reps,
    }
    env = MEMORY_ENV if mode == "memory" else None
    calls: dict[str, tuple[str, dict[str, Any]]] = {}
    for variant in selected_variants(ctx):
        if variant in ORT_VARIANTS:
            folders = prepared.arena_off if mode == "memory" else prepared.artifacts
            task, params = "ort_train", {**common, "artifacts": str(folders[variant])}
        else:
            task = "torch_train"
            params = {
                **common,
                "model": config.model,
                "variant": variant.removeprefix("torch_"),
                "trainable_params": prepared.trainable_params,
                "trained_modules": prepared.trained_modules,
                "r": PATCH_SIZE,
                # Module name -> r for layers with their own r (as the compiled plan has them).
                "module_patch_sizes": {
                    weight.rsplit(".", 1)[0]: r for weight, r in PATCH_SIZE_MAPS.get(config.model, {}).items()
                },
            }
        calls[variant] = (task, params)
    results: dict[str, list[dict[str, Any]]] = {variant: [] for variant in calls}
    # Round-robin over the variants, so load from other processes is shared by all of them.
    for _ in range(ctx.repeat):
        for variant, (task, params) in calls.items():
            results[variant].append(run_worker(task, params, env=env))
    return results


def settings_json(settings: TrainSettings) -> dict[str, Any]:
    return asdict(settings)


def suite_header(settings: TrainSettings, threads: int, repeat: int) -> dict[str, Any]:
    """The settings every training-step suite (memory, step) records beside its entries."""
    return {
        "settings": settings_json(settings),
        "threads": threads,
        "repeat": repeat,
        "num_classes": NUM_CLASSES,
        "train_layers": TRAIN_LAYERS,
        "patch_size": PATCH_SIZE,
        "row_tiles": ROW_TILES,
    }


def compiler_note(entries: list[dict[str, Any]]) -> str:
    """One line naming the passes (and source fingerprints) of the artifacts that were measured."""
    builds = {(tuple(e["compiler"]["training_passes"]), e["compiler"]["fingerprint"]) for e in entries}
    described = "; ".join(f"{', '.join(passes)} (sources {fingerprint})" for passes, fingerprint in sorted(builds))
    return f"Artifacts compiled with the training passes {described}."


# --------------------------------------------------------------------------------------
# Worker: one configuration
# --------------------------------------------------------------------------------------


def _batch(params: dict):
    import numpy as np

    rng = np.random.default_rng(params["seed"])
    x = rng.standard_normal((params["batch"], *params["input_shape"]), dtype=np.float32)
    # Class ids per sample, or per pixel for segmentation (label_shape = [H, W]).
    y = rng.integers(0, params["num_classes"], size=(params["batch"], *params["label_shape"])).astype(np.int64)
    return x, y


def _measure(step: Callable[[], float], params: dict) -> dict[str, Any]:
    """Memory of the first (and second) step after loading, or the median step time.

    memory: peak RSS during step 1 minus the RSS right after loading. The kernel's high-water
    mark is reset after loading (if the kernel allows it), so ru_maxrss measured after the
    step is the step's own peak; `step1_delta_no_reset_bytes` is the literal ru_maxrss
    difference without that reset, which is 0 when loading peaked higher than the step.
    """
    import gc

    gc.collect()
    if params["mode"] == "step":
        times = repeat_timed(
            step,
            warmup=params["warmup"],
            min_reps=params["min_reps"],
            min_time_s=params["min_time_s"],
            max_reps=params["max_reps"],
        )
        return {"stats": timing_stats(times), "loss": step()}
    load_peak = peak_rss_bytes()
    post_load_rss = current_rss_bytes()
    reset = reset_peak_rss()
    post_load = peak_rss_bytes() if reset else load_peak
    begin = time.perf_counter()
    loss = step()
    step1_s = time.perf_counter() - begin
    peak1 = peak_rss_bytes()
    after1 = current_rss_bytes()
    step2 = loss2 = None
    if reset and reset_peak_rss():
        base2 = peak_rss_bytes()
        loss2 = step()
        step2 = peak_rss_bytes() - base2
    return {
        "hwm_reset": reset,
        "load_peak_bytes": load_peak,
        "post_load_rss_bytes": post_load_rss,
        "post_load_maxrss_bytes": post_load,
        "step1_peak_bytes": peak1,
        "step1_delta_bytes": peak1 - post_load,
        "step1_delta_no_reset_bytes": max(peak1, load_peak) - load_peak,
        "after_step1_rss_bytes": after1,
        "step2_delta_bytes": step2,
        "step1_s": step1_s,
        "loss": loss,
        # After one update: tells apart variants whose gradients differ (same batch, same weights).
        "loss2": loss2,
    }


def open_trainer(artifacts: Path, threads: int):
    """`runtime.trainer.Trainer` on `artifacts` with the benchmark's thread count (worker processes only)."""
    import runtime.trainer as trainer_module

    compiled_options = trainer_module.session_options

    def with_threads(manifest: dict):
        # The manifest carries the arena flag; the thread count is the benchmark's, not the artifact's.
        options = compiled_options(manifest)
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return options

    trainer_module.session_options = with_threads
    return trainer_module.Trainer(Path(artifacts))


def ort_task(params: dict) -> dict[str, Any]:
    threads = params["threads"]
    trainer = open_trainer(Path(params["artifacts"]), threads)
    x, y = _batch(params)
    result = _measure(lambda: trainer.train_step(x, y), params)
    result["session_options"] = {**trainer.manifest["session_options"], "intra_op_num_threads": threads}
    return result


def _checkpoint_blocks(model, trained_modules: list[str]) -> list[str]:
    """Wrap each block holding a trained conv (e.g. features.17, layer4.1) in torch.utils.checkpoint."""
    from torch import nn
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

        def forward(self, x):
            return checkpoint(self.block, x, use_reentrant=False)

    blocks = list(dict.fromkeys(".".join(name.split(".")[:2]) for name in trained_modules))
    for name in blocks:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Checkpointed(getattr(parent, attr)))
    return blocks


def torch_task(params: dict) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from models import build

    torch.set_num_threads(params["threads"])
    torch.manual_seed(params["seed"])
    model = build(params["model"], num_classes=params["num_classes"])
    model.eval()  # BN with running statistics, as the compiled artifacts do
    trainable = set(params["trainable_params"])
    named = dict(model.named_parameters())
    missing = trainable - set(named)
    if missing:
        raise RuntimeError(f"the compiled plan trains parameters torch does not have: {sorted(missing)}")
    for name, parameter in named.items():
        parameter.requires_grad_(name in trainable)
    extra: dict[str, Any] = {}
    if params["variant"] == "filtered":
        from tests.reference.gradient_filter_torch import replace_last_convs

        replaced = replace_last_convs(model, len(params["trained_modules"]), params["r"])
        if replaced != params["trained_modules"]:
            raise RuntimeError(f"torch filters {replaced}, the compiled plan trains {params['trained_modules']}")
        for name, r in params["module_patch_sizes"].items():
            model.get_submodule(name).r = r
        extra["filtered_modules"] = replaced
    elif params["variant"] == "checkpoint":
        extra["checkpointed_blocks"] = _checkpoint_blocks(model, params["trained_modules"])
    optimizer = torch.optim.AdamW([named[name] for name in params["trainable_params"]], lr=1e-3, weight_decay=0.0)
    x_np, y_np = _batch(params)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    result = _measure(step, params)
    result.update(extra, torch_threads=torch.get_num_threads())
    return result

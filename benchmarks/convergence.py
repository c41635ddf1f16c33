"""Suite `convergence`: time to accuracy of exact backprop vs gradient filtering, through compiled artifacts.

Gradient filtering makes a backward step cheaper but its gradients are approximate, so a
filtered run may need more steps. What a user wants to know is whether it reaches a given
accuracy sooner on the wall clock. This suite fine-tunes the bundled digits model (MobileNetV2
x0.5 pretrained on digits 0-4, `models/pretrain_digits.py`) on digits 5-9 with artifacts
compiled by `gfcompile.pipeline.compile_model` and trained by `runtime.trainer.Trainer`, and
evaluates the held-out test set every `eval_every` steps. Per (input size, last N layers):

* target = mean over seeds of exact backprop's plateau accuracy (mean of its last
  `PLATEAU_EVALS` evaluations) minus 1 point;
* steps / seconds to reach AND hold the target: the first evaluation from which every later
  evaluation of the run is at or above it (seconds = training wall clock up to it, evaluation
  excluded); a run that ends below the target never reached it;
* plateau accuracy per variant, and paired differences to exact (same seed = same batches, same
  initial weights) with 95% t-intervals over seeds;
* with `feature_cache`: artifacts compiled with `--feature-cache`, trained by
  `runtime.feature_cache.CachedTrainer` (the frozen prefix runs once per sample into a cache, each
  step runs the tail only) and evaluated on cached test features. The cache is built once per
  distinct prefix model (exact and filtered share one when their prefix models hash alike), in a
  worker of its own, and its build time is added in full to every run's time to accuracy, as a
  user pays it once per run. Runs through the whole graph (`uncached_seeds` of them,
  `uncached_steps` long) measure the uncached step time in the same run and check that the two
  paths follow the same curve; uncached time to accuracy is then derived as steps to reach x that
  median step time, and labelled so;
* gradient SNR at the pretrained weights: measured on the compiled artifacts (same batch, exact
  vs filtered weight gradients of each trained conv: |g|² / |g~ - g|², in dB) beside our reading
  of the paper's Proposition 1, which ties the filtered gradient's quality to how much of the
  output gradient g_y's energy lies in its r x r patch means: predicted SNR of g_y =
  |P g_y|² / |g_y - P g_y|² (P: patch mean, then nearest upsample), from torch autograd on the
  same weights and batch.

Sizes: 64² (the model's own size, last layers see 2x2 maps) and, where
`models/zoo/mobilenetv2_digits_224.onnx` exists (`models/pretrain_digits_224.py`), 224² (7x7
maps, as in the paper). Configurations whose r does not fit a layer's map are reported as such.
Each (variant, seed) runs in its own worker process.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from .common import REPO_ROOT, SuiteContext, SuiteResult, fmt, md_table, run_worker

DATA_DIR = REPO_ROOT / "models" / "data"
ZOO_DIR = REPO_ROOT / "models" / "zoo"
SOURCES = {64: ZOO_DIR / "mobilenetv2_digits.onnx", 224: ZOO_DIR / "mobilenetv2_digits_224.onnx"}
BATCH = 32
LR = 0.003  # the demo's and the accuracy suite's
TARGET_MARGIN = 0.01  # "exact's final accuracy minus 1 point"
PLATEAU_EVALS = 3


@dataclass(frozen=True)
class ConvergenceSettings:
    sizes: tuple[int, ...]
    layers: tuple[int, ...]  # last N convs trained (and filtered, for the r variants)
    patch_sizes: tuple[int, ...]  # filtered variants; exact always runs
    seeds: tuple[int, ...]
    steps: int
    eval_every: int
    snr_batches: int  # batches the gradient SNR is summed over (0: no SNR)
    feature_cache: bool = False  # train the tail on cached frozen-prefix features (module docstring)
    uncached_seeds: int = 0  # with the cache: the first this many seeds also train through the whole graph
    uncached_steps: int = 0  # ... for this many steps (0: `steps`)


SETTINGS = {
    # A smoke test of every code path: cached runs, one uncached run per variant, SNR.
    "quick": ConvergenceSettings(
        sizes=(64,),
        layers=(2,),
        patch_sizes=(2,),
        seeds=(0,),
        steps=8,
        eval_every=4,
        snr_batches=1,
        feature_cache=True,
        uncached_seeds=1,
        uncached_steps=4,
    ),
    # Every size, depth and r, with the cache; exact at 224², last 2 convs, still climbs at step 500.
    "full": ConvergenceSettings(
        sizes=(64, 224),
        layers=(2, 4, 8),
        patch_sizes=(2, 4),
        seeds=tuple(range(10)),
        steps=500,
        eval_every=10,
        snr_batches=4,
        feature_cache=True,
        uncached_seeds=2,
        uncached_steps=250,
    ),
}


def variant_key(r: int | None) -> str:
    return "exact" if r is None else f"r{r}"


# --------------------------------------------------------------------------------------
# Parent
# --------------------------------------------------------------------------------------


def run(ctx: SuiteContext, settings: ConvergenceSettings | None = None) -> SuiteResult:
    settings = settings or SETTINGS[ctx.profile]
    groups = []
    for size in settings.sizes:
        if not SOURCES[size].is_file():
            ctx.log(f"convergence: {SOURCES[size]} missing (python -m models.pretrain_digits_224); {size}² skipped")
            continue
        train, test = task_files(ctx, size)
        for n in settings.layers:
            groups.append(_run_group(ctx, settings, size, n, train, test))
    data = {"settings": {**asdict(settings), "batch": BATCH, "lr": LR, "target_margin": TARGET_MARGIN}}
    data["groups"] = groups
    return SuiteResult(data=data, markdown=_markdown(data), plot=lambda path: _plot(data, path))


def task_files(ctx: SuiteContext, size: int) -> tuple[Path, Path]:
    """The digits 5-9 fine-tuning data at `size`²: the bundled 64² files, or the 224² rendering."""
    if size == 64:
        return DATA_DIR / "digits_5to9_train.npz", DATA_DIR / "digits_5to9_test.npz"
    import numpy as np

    from models.pretrain_digits_224 import digits_224_task

    folder = ctx.cache_dir / "convergence"
    folder.mkdir(parents=True, exist_ok=True)
    paths = (folder / f"digits_5to9_train_{size}.npz", folder / f"digits_5to9_test_{size}.npz")
    if not all(path.is_file() for path in paths):
        task = digits_224_task()
        for path, key in zip(paths, ("finetune_train", "finetune_test"), strict=True):
            temporary = path.with_name(path.stem + ".tmp.npz")
            x, y = task[key]
            np.savez(temporary, x=x, y=y)
            temporary.replace(path)  # a cached file is a complete one
    return paths


def compile_variant(ctx: SuiteContext, size: int, n: int, r: int | None, feature_cache: bool = False) -> Path | str:
    """Compiled artifacts for one variant (cached), or the one-line reason it cannot be planned.

    With `feature_cache` the artifacts also hold the prefix and tail models; their whole-graph
    models are the ones an uncached run trains.
    """
    import json

    from gfcompile.config import CompileConfig
    from gfcompile.errors import GfError
    from gfcompile.pipeline import compile_model
    from runtime.trainer import sha256_file

    from .training import _compiler_fingerprint

    source = SOURCES[size]
    kwargs = {"train_layers": n, "filter_layers": n if r else 0, "patch_size": r or 2, "feature_cache": feature_cache}
    suffix = "_fc" if feature_cache else ""
    out = ctx.cache_dir / "convergence" / f"digits_{size}_b{BATCH}_n{n}_{variant_key(r)}{suffix}"
    stamp = out.with_name(out.name + ".stamp.json")
    expected = {"source": sha256_file(source), "compiler": _compiler_fingerprint(), "lr": LR, **kwargs}
    cached = ctx.use_cache and stamp.is_file() and (out / "manifest.json").is_file()
    if cached and json.loads(stamp.read_text()) == expected:
        return out
    config = CompileConfig(batch_size=BATCH, lr=LR, output_dir=out, force=True, **kwargs)
    try:
        compile_model(source, config, report=lambda message: None)
    except (GfError, ValueError) as exc:
        return str(exc).splitlines()[0]
    stamp.write_text(json.dumps(expected, indent=2) + "\n")
    return out


def _run_group(
    ctx: SuiteContext, settings: ConvergenceSettings, size: int, n: int, train: Path, test: Path
) -> dict[str, Any]:
    variants: dict[str, Path] = {}
    skipped: dict[str, str] = {}
    for r in (None, *settings.patch_sizes):
        built = compile_variant(ctx, size, n, r, settings.feature_cache)
        if isinstance(built, Path):
            variants[variant_key(r)] = built
        else:
            skipped[variant_key(r)] = built
            ctx.log(f"convergence: {size}² N={n} {variant_key(r)} cannot be planned: {built}")
    if "exact" not in variants:
        raise RuntimeError(f"convergence: the exact variant of {size}² N={n} did not compile: {skipped['exact']}")
    caches = _build_caches(ctx, size, n, variants, train, test) if settings.feature_cache else {}
    runs: dict[str, list[dict[str, Any]]] = {key: [] for key in variants}
    uncached: dict[str, list[dict[str, Any]]] = {key: [] for key in variants}
    # Seed-major order: load from other processes on the machine hits every variant alike.
    for seed in settings.seeds:
        for key, artifacts in variants.items():
            params = {
                "artifacts": str(artifacts),
                "train": str(train),
                "test": str(test),
                "steps": settings.steps,
                "eval_every": settings.eval_every,
                "seed": seed,
                "threads": ctx.threads,
                "cache": caches[key]["folders"] if caches else None,
            }
            result = run_worker("convergence_train", params, timeout=3600)
            runs[key].append(result)
            ctx.log(
                f"convergence: {size}² N={n} {key} seed {seed}{' cached' if caches else ''}: accuracy "
                f"{result['curve'][-1]['accuracy']:.4f} after {settings.steps} steps ({result['train_s']:.1f} s "
                f"training, load {result['worker']['loadavg_1min_end']})"
            )
            if caches and seed in settings.seeds[: settings.uncached_seeds]:
                steps = settings.uncached_steps or settings.steps
                result = run_worker("convergence_train", {**params, "cache": None, "steps": steps}, timeout=3600)
                uncached[key].append(result)
                ctx.log(
                    f"convergence: {size}² N={n} {key} seed {seed} uncached: {steps} steps in "
                    f"{result['train_s']:.1f} s (load {result['worker']['loadavg_1min_end']})"
                )
    snr = {
        key: run_worker(
            "convergence_snr",
            {
                "exact": str(variants["exact"]),
                "filtered": str(path),
                "source": str(SOURCES[size]),
                "train": str(train),
                "batches": settings.snr_batches,
                "threads": ctx.threads,
            },
        )
        for key, path in variants.items()
        if key != "exact" and settings.snr_batches
    }
    build_s = {key: cache["train_build_s"] for key, cache in caches.items()}
    summary = analyse(runs, build_s or None, {key: found for key, found in uncached.items() if found} or None)
    return {"size": size, "n": n, "skipped": skipped, "snr": snr, "caches": caches, **summary}


def _build_caches(
    ctx: SuiteContext, size: int, n: int, variants: dict[str, Path], train: Path, test: Path
) -> dict[str, dict[str, Any]]:
    """Per variant: its cache folders and build times. One build per distinct prefix model (by sha256)."""
    import json

    from runtime.manifest import MANIFEST

    built: dict[str, dict[str, Any]] = {}
    caches = {}
    for key, artifacts in variants.items():
        manifest = json.loads((artifacts / MANIFEST).read_text())
        prefix_sha = manifest["files"][manifest["feature_cache"]["prefix_model"]]
        if prefix_sha not in built:
            folder = ctx.cache_dir / "convergence" / "features" / f"{size}_n{n}_{prefix_sha[:16]}"
            folders = {"train": str(folder / "train"), "test": str(folder / "test")}
            params = {"artifacts": str(artifacts), "train": str(train), "test": str(test), "threads": ctx.threads}
            built[prefix_sha] = {**run_worker("convergence_cache", {**params, "folders": folders}), "folders": folders}
            ctx.log(
                f"convergence: {size}² N={n} feature cache built from {key}'s prefix: training set "
                f"{built[prefix_sha]['train_build_s']:.1f} s, test set {built[prefix_sha]['test_build_s']:.1f} s"
            )
        caches[key] = {**built[prefix_sha], "prefix_sha256": prefix_sha}
    return caches


def reach_and_hold(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation from which the run stays at or above `target` to the end; None if it ends below."""
    first = None
    for index, point in enumerate(curve):
        if point["accuracy"] < target:
            first = None
        elif first is None:
            first = index
    return None if first is None else curve[first]


def plateau(curve: list[dict[str, Any]]) -> float:
    return statistics.fmean(point["accuracy"] for point in curve[-PLATEAU_EVALS:])


def paired_interval(differences: list[float]) -> dict[str, Any]:
    """Mean of paired differences with a two-sided 95% t-interval (None bounds for fewer than 2 pairs)."""
    from scipy import stats

    count = len(differences)
    if count == 0:
        return {"n": 0, "mean": None, "low": None, "high": None}
    mean = statistics.fmean(differences)
    if count < 2:
        return {"n": 1, "mean": mean, "low": None, "high": None}
    half = stats.t.ppf(0.975, count - 1) * statistics.stdev(differences) / math.sqrt(count)
    return {"n": count, "mean": mean, "low": mean - half, "high": mean + half}


def step_times(curve: list[dict[str, Any]]) -> list[float]:
    """Seconds per training step over each stretch between two evaluations."""
    return [
        (b["train_s"] - a["train_s"]) / (b["step"] - a["step"])
        for a, b in zip(curve, curve[1:], strict=False)
        if b["step"] > a["step"]
    ]


def median_step_s(runs: list[dict[str, Any]]) -> float:
    """Median over every stretch of every run: robust to the machine's load drifting during a run."""
    return statistics.median(t for run in runs for t in step_times(run["curve"]))


def seconds_to_reach(reached: list[dict[str, Any] | None], cache_build_s: float = 0.0) -> list[float | None]:
    """Measured wall clock to reach and hold: training seconds up to the point, plus the cache build paid once."""
    return [None if point is None else cache_build_s + point["train_s"] for point in reached]


def derived_seconds_to_reach(reached: list[dict[str, Any] | None], step_s: float) -> list[float | None]:
    """Wall clock a run through the whole graph would need: the same steps (same curve) x its median step time."""
    return [None if point is None else point["step"] * step_s for point in reached]


def first_crossing(curve: list[dict[str, Any]], target: float) -> int | None:
    return next((point["step"] for point in curve if point["accuracy"] >= target), None)


def agreement(cached: dict[str, Any], uncached: dict[str, Any], target: float) -> dict[str, Any]:
    """How closely a run through the whole graph follows the cached run of the same seed, over their common evaluations."""
    common = min(len(cached["curve"]), len(uncached["curve"]))
    a, b = cached["curve"][:common], uncached["curve"][:common]
    full = len(uncached["curve"]) == len(cached["curve"])
    reached = reach_and_hold(b, target) if full else None
    return {
        "seed": cached["seed"],
        "evals": common,
        "max_accuracy_difference": max(abs(p["accuracy"] - q["accuracy"]) for p, q in zip(a, b, strict=True)),
        "first_crossing": {"cached": first_crossing(a, target), "uncached": first_crossing(b, target)},
        # Only a run as long as the cached one can say where it reaches and holds.
        "uncached_reached": None if reached is None else {"step": reached["step"], "s": reached["train_s"]},
    }


def analyse(
    runs: dict[str, list[dict[str, Any]]],
    cache_build_s: dict[str, float] | None = None,
    uncached: dict[str, list[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """Target, per-run reach-and-hold points and plateaus, seconds to the target, and paired comparisons to exact.

    `runs` trained through the whole graph, or, with `cache_build_s` (per variant: the seconds its
    feature cache took to build), through the cache; `uncached`: shorter runs through the whole
    graph of the same variants, whose median step time gives the derived uncached seconds.
    """
    target = statistics.fmean(plateau(run["curve"]) for run in runs["exact"]) - TARGET_MARGIN
    per_variant: dict[str, Any] = {}
    for key, key_runs in runs.items():
        reached = [reach_and_hold(run["curve"], target) for run in key_runs]
        step_s = median_step_s(key_runs)
        if cache_build_s is None:
            clocks = {"uncached": seconds_to_reach(reached)}
        else:
            clocks = {"cached": seconds_to_reach(reached, cache_build_s[key])}
        summary = {
            "plateau": [plateau(run["curve"]) for run in key_runs],
            "reached": [None if point is None else {"step": point["step"], "s": point["train_s"]} for point in reached],
            "step_s_median": step_s,
            "final_loss": [run["curve"][-1]["train_loss"] for run in key_runs],
        }
        if uncached:
            summary["uncached_step_s_median"] = median_step_s(uncached[key])
            clocks["uncached (derived)"] = derived_seconds_to_reach(reached, summary["uncached_step_s_median"])
            by_seed = {run["seed"]: run for run in key_runs}
            summary["agreement"] = [agreement(by_seed[run["seed"]], run, target) for run in uncached[key]]
        summary["seconds_to_target"] = clocks
        per_variant[key] = summary
    exact = per_variant["exact"]
    for summary in per_variant.values():
        pairs = list(zip(summary["reached"], exact["reached"], strict=True))
        both = [(mine, ref) for mine, ref in pairs if mine is not None and ref is not None]
        summary["vs_exact"] = {
            "plateau_gap": paired_interval([a - b for a, b in zip(summary["plateau"], exact["plateau"], strict=True)]),
            "step_difference": paired_interval([mine["step"] - ref["step"] for mine, ref in both]),
            "seeds_reached": sum(point is not None for point in summary["reached"]),
            "step_time_ratio": summary["step_s_median"] / exact["step_s_median"],
            "clocks": {
                label: _clock_comparison(seconds, exact["seconds_to_target"][label])
                for label, seconds in summary["seconds_to_target"].items()
            },
        }
        if uncached:
            summary["vs_exact"]["uncached_step_time_ratio"] = (
                summary["uncached_step_s_median"] / exact["uncached_step_s_median"]
            )
    return {"target": target, "variants": per_variant, "runs": runs, "uncached_runs": uncached or {}}


def _clock_comparison(mine: list[float | None], exact: list[float | None]) -> dict[str, Any]:
    """Median seconds to the target, and the paired difference to exact over the seeds where both reached it."""
    both = [(a, b) for a, b in zip(mine, exact, strict=True) if a is not None and b is not None]
    reached = [value for value in mine if value is not None]
    return {
        "median_s": statistics.median(reached) if reached else None,
        "difference_s": paired_interval([a - b for a, b in both]),
        "seeds_faster": sum(a < b for a, b in both),
        "pairs": len(both),
    }


# --------------------------------------------------------------------------------------
# Workers
# --------------------------------------------------------------------------------------


def _open_trainer(params: dict) -> Any:
    """The Trainer on the artifacts' whole graph, or, with params["cache"], the CachedTrainer on its tail."""
    from runtime.feature_cache import CachedTrainer, CacheSettings

    from .training import open_trainer

    if not params.get("cache"):
        return open_trainer(Path(params["artifacts"]), params["threads"])
    import runtime.feature_cache
    import runtime.trainer

    settings = CacheSettings(Path(params["cache"]["train"]))
    trainer = CachedTrainer(
        Path(params["artifacts"]),
        settings=settings,
        backend=lambda tail, checkpoint, lr: open_trainer(tail, params["threads"]),
    )
    # open_trainer pinned the threads of runtime.trainer's sessions; the prefix session is runtime.feature_cache's.
    runtime.feature_cache.session_options = runtime.trainer.session_options
    return trainer


def train_task(params: dict) -> dict[str, Any]:
    """Fine-tune from the pretrained weights, evaluating every `eval_every` steps (evaluation not timed).

    With params["cache"] (folders of an already built cache), training and evaluation run on cached
    features; opening them (reading and hashing the files) is timed apart from training.
    """
    from runtime.data import load_data
    from runtime.feature_cache import CacheSettings

    trainer = _open_trainer(params)
    train = load_data(Path(params["train"]), trainer.manifest)
    test = load_data(Path(params["test"]), trainer.manifest)
    cache_open_s = None
    if params.get("cache"):
        started = time.perf_counter()
        trainer.features(train)
        cache_open_s = time.perf_counter() - started
        test_cache = CacheSettings(Path(params["cache"]["test"]))

        def evaluate():
            return trainer.evaluate(test, cache=test_cache)
    else:

        def evaluate():
            return trainer.evaluate(test)

    start = evaluate()
    curve = [{"step": 0, "train_s": 0.0, "accuracy": start.accuracy, "loss": start.loss, "train_loss": None}]
    train_s = 0.0
    while trainer.step < params["steps"]:
        chunk = min(params["eval_every"], params["steps"] - trainer.step)
        started = time.perf_counter()
        # The data order depends only on (seed, step): chunked training sees the batches of one long run.
        losses = trainer.fit(train, chunk, seed=params["seed"], log_every=0)
        train_s += time.perf_counter() - started
        result = evaluate()
        curve.append(
            {
                "step": trainer.step,
                "train_s": train_s,
                "accuracy": result.accuracy,
                "loss": result.loss,
                "train_loss": statistics.fmean(losses),
            }
        )
    if params.get("cache") and trainer.cache.built:  # the build is timed in cache_task, not here
        raise RuntimeError(f"convergence: the feature cache in {params['cache']['train']} was rebuilt inside a run")
    return {
        "seed": params["seed"],
        "steps": trainer.step,
        "train_s": train_s,
        "cache_open_s": cache_open_s,
        "curve": curve,
    }


def cache_task(params: dict) -> dict[str, Any]:
    """Build the feature caches of the training and test sets from scratch, as CachedTrainer does; seconds of each."""
    import shutil

    from runtime.data import load_data
    from runtime.feature_cache import CacheSettings

    trainer = _open_trainer({**params, "cache": params["folders"]})
    seconds = {}
    for name in ("train", "test"):
        folder = Path(params["folders"][name])
        shutil.rmtree(folder, ignore_errors=True)  # so this is a build, never the reuse of an earlier one
        data = load_data(Path(params[name]), trainer.manifest)
        started = time.perf_counter()
        trainer.features(data, CacheSettings(folder))
        seconds[name] = time.perf_counter() - started
    return {"train_build_s": seconds["train"], "test_build_s": seconds["test"]}


def _trained_conv_weights(source: Path, manifest: dict) -> dict[str, int | None]:
    """Weight name -> patch size (None: exact) of each trained conv, in the plan's order."""
    import onnx

    graph = onnx.load(source, load_external_data=False).graph
    weight_of = {node.name: node.input[1] for node in graph.node if node.op_type == "Conv"}
    plan = manifest["plan"]
    return {weight_of[node]: plan["filtered"].get(node) for node in plan["trainable_convs"]}


def snr_task(params: dict) -> dict[str, Any]:
    """Per trained conv: measured SNR of the filtered weight gradient and the Proposition 1 reading's prediction."""
    import numpy as np

    from runtime.data import batches, load_data

    from .training import open_trainer

    exact = open_trainer(Path(params["exact"]), params["threads"])
    filtered = open_trainer(Path(params["filtered"]), params["threads"])
    data = load_data(Path(params["train"]), exact.manifest)
    filtered_r = _trained_conv_weights(Path(params["source"]), filtered.manifest)
    weights = list(filtered_r)
    signal = dict.fromkeys(weights, 0.0)
    noise = dict.fromkeys(weights, 0.0)
    cosine_parts = {w: [0.0, 0.0, 0.0] for w in weights}
    inputs = []
    for _, (x, y) in zip(range(params["batches"]), batches(data, exact.batch_size, seed=0), strict=False):
        inputs.append((x, y))
        grads = []
        for trainer in (exact, filtered):
            trainer.module.train()
            trainer.module(x, y)
            grads.append({w: np.array(trainer.state.parameters[w].grad, dtype=np.float64) for w in weights})
            trainer.module.lazy_reset_grad()
        for w in weights:
            g, g_f = grads[0][w], grads[1][w]
            signal[w] += float(np.sum(g * g))
            noise[w] += float(np.sum((g_f - g) ** 2))
            parts = cosine_parts[w]
            parts[0] += float(np.sum(g * g_f))
            parts[1] += float(np.sum(g * g))
            parts[2] += float(np.sum(g_f * g_f))
    predicted = _patch_energy_snr(Path(params["source"]), inputs, weights, filtered_r)
    layers = []
    for w in weights:
        dot, gg, ff = cosine_parts[w]
        layers.append(
            {
                "weight": w,
                "r": filtered_r.get(w),
                "measured_snr_db": _db(signal[w], noise[w]),
                "cosine": dot / math.sqrt(gg * ff) if gg and ff else None,
                "predicted_snr_db": predicted.get(w),
            }
        )
    return {"layers": layers, "batches": len(inputs)}


def _db(signal: float, noise: float) -> float | None:
    if noise == 0:
        return None  # identical gradients: infinite SNR
    return 10 * math.log10(signal / noise)


def _patch_energy_snr(source: Path, inputs: list, weights: list[str], patch: dict[str, int | None]) -> dict[str, float]:
    """|P g_y|² / |g_y - P g_y|² in dB for each filtered conv, with exact g_y from torch autograd (BN in eval)."""
    import numpy as np
    import torch

    from models.pretrain_digits_224 import load_digits_model

    model = load_digits_model(source).eval()
    modules = {
        name + ".weight": module for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)
    }
    outputs: dict[str, torch.Tensor] = {}

    def keep_output(weight: str):
        def hook(_module, _inputs, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[weight] = out

        return hook

    hooks = [modules[w].register_forward_hook(keep_output(w)) for w in weights if patch.get(w)]
    kept = {w: 0.0 for w in weights if patch.get(w)}
    lost = dict(kept)
    for x, y in inputs:  # already preprocessed by runtime.data
        model.zero_grad()
        logits = model(torch.from_numpy(np.asarray(x)))
        torch.nn.functional.cross_entropy(logits, torch.from_numpy(np.asarray(y))).backward()
        for w, out in outputs.items():
            r = patch[w]
            g = out.grad.double()
            h, wd = g.shape[-2:]
            pad = (0, (-wd) % r, 0, (-h) % r)
            padded = torch.nn.functional.pad(g, pad)
            # Mean over each r x r patch's real pixels (the gradient filter's mean ignores padding).
            ones = torch.nn.functional.pad(torch.ones_like(g[:1, :1]), pad)
            sums = torch.nn.functional.avg_pool2d(padded, r, divisor_override=1)
            counts = torch.nn.functional.avg_pool2d(ones, r, divisor_override=1)
            mean = (sums / counts).repeat_interleave(r, -2).repeat_interleave(r, -1)[..., :h, :wd]
            kept[w] += float((mean * mean).sum())
            lost[w] += float(((g - mean) ** 2).sum())
    for hook in hooks:
        hook.remove()
    return {w: _db(kept[w], lost[w]) for w in kept}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def _ci(stat: dict[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    if stat["mean"] is None:
        return "—"
    if stat["low"] is None:
        return f"{stat['mean'] * scale:+.{digits}f}"
    return (
        f"{stat['mean'] * scale:+.{digits}f} ({stat['low'] * scale:+.{digits}f} to {stat['high'] * scale:+.{digits}f})"
    )


def _median_reached(points: list[dict[str, Any] | None], key: str) -> float | None:
    values = [point[key] for point in points if point is not None]
    return statistics.median(values) if values else None


def _markdown(data: dict[str, Any]) -> str:
    s = data["settings"]
    lines = [
        f"Fine-tuning on digits 5-9 through compiled artifacts: batch {s['batch']}, AdamW lr {s['lr']}, "
        f"{s['steps']} steps, test accuracy every {s['eval_every']} steps, seeds {list(s['seeds'])}. "
        f"Target = exact's plateau (mean of its last {PLATEAU_EVALS} evaluations, mean over seeds) minus "
        f"{s['target_margin'] * 100:.0f} point; 'reach and hold' = first evaluation from which the run stays "
        "at or above it. Differences are paired by seed, 95% t-intervals.",
        "",
    ]
    headers = ["size", "N", "variant", "target %", "plateau %", "gap vs exact (pts)", "reached", "median steps"]
    headers += ["final train loss"]
    rows = []
    for group in data["groups"]:
        for key, v in group["variants"].items():
            cmp = v["vs_exact"]
            rows.append(
                [
                    f"{group['size']}²",
                    group["n"],
                    key,
                    fmt(100 * group["target"], 1),
                    fmt(100 * statistics.fmean(v["plateau"]), 1),
                    "—" if key == "exact" else _ci(cmp["plateau_gap"], 100),
                    f"{cmp['seeds_reached']}/{len(v['plateau'])}",
                    fmt(_median_reached(v["reached"], "step"), 0),
                    fmt(statistics.fmean(v["final_loss"]), 3),
                ]
            )
        for key, reason in group["skipped"].items():
            rows.append([f"{group['size']}²", group["n"], key, "does not fit: " + reason] + ["—"] * 5)
    lines += [md_table(headers, rows, numeric_from=3), ""]
    lines += _time_markdown(data)
    snr_rows = []
    for group in data["groups"]:
        for key, snr in group["snr"].items():
            for layer in snr["layers"]:
                snr_rows.append(
                    [
                        f"{group['size']}²",
                        group["n"],
                        key,
                        f"`{layer['weight']}`",
                        fmt(layer["measured_snr_db"], 1),
                        fmt(layer["cosine"], 3),
                        fmt(layer["predicted_snr_db"], 1),
                    ]
                )
    if not snr_rows:
        return "\n".join(lines)
    lines += [
        "## Gradient SNR at the pretrained weights",
        "",
        "Measured: exact vs filtered weight gradients of each trained conv from the compiled artifacts, "
        f"{s['snr_batches']} batches. Predicted (our reading of the paper's Proposition 1): energy of g_y's r x r "
        "patch means over the energy it discards, exact g_y from torch autograd on the same weights and batches "
        "(filtered convs only; earlier convs also receive an approximate g_y).",
        "",
        md_table(["size", "N", "variant", "layer", "measured SNR dB", "cosine", "predicted SNR dB"], snr_rows, 4),
    ]
    return "\n".join(lines)


def _time_markdown(data: dict[str, Any]) -> list[str]:
    """Seconds to reach and hold the target per clock (cached measured, uncached measured or derived)."""
    s = data["settings"]
    lines = [
        "## Wall clock to reach and hold the target",
        "",
        "Training wall clock (evaluation excluded) up to the reach-and-hold evaluation; 'cached' adds the "
        "training set's feature-cache build time in full to every run (built once per prefix model, column "
        "'cache build'; the test set's build is evaluation cost, not counted); 'uncached (derived)' = steps to "
        "reach x the median step time of the runs through the whole graph in this run. Δ = paired difference "
        "to exact over the seeds where both reached the target; step ms = median over every "
        f"{s['eval_every']}-step stretch of every run.",
        "",
    ]
    headers = ["size", "N", "variant", "clock", "step ms", "step ÷ exact", "cache build s (train / test)"]
    headers += ["median s to target", "Δ s vs exact", "faster seeds"]
    rows = []
    for group in data["groups"]:
        for key, v in group["variants"].items():
            cmp = v["vs_exact"]
            for label, clock in cmp["clocks"].items():
                cached = label == "cached"
                step_s = (
                    v["step_s_median"] if cached or "uncached_step_s_median" not in v else v["uncached_step_s_median"]
                )
                ratio = (
                    cmp["step_time_ratio"]
                    if cached or "uncached_step_s_median" not in v
                    else cmp["uncached_step_time_ratio"]
                )
                cache = group["caches"].get(key)
                rows.append(
                    [
                        f"{group['size']}²",
                        group["n"],
                        key,
                        label,
                        fmt(1000 * step_s, 0),
                        fmt(ratio, 2),
                        f"{cache['train_build_s']:.1f} / {cache['test_build_s']:.1f}" if cached and cache else "—",
                        fmt(clock["median_s"], 1),
                        "—" if key == "exact" else _ci(clock["difference_s"]),
                        "—" if key == "exact" else f"{clock['seeds_faster']}/{clock['pairs']}",
                    ]
                )
    lines += [md_table(headers, rows, numeric_from=4), ""]
    checks = []
    for group in data["groups"]:
        for key, v in group["variants"].items():
            for check in v.get("agreement", []):
                reached = check["uncached_reached"]
                checks.append(
                    [
                        f"{group['size']}²",
                        group["n"],
                        key,
                        check["seed"],
                        check["evals"],
                        fmt(100 * check["max_accuracy_difference"], 2),
                        f"{check['first_crossing']['cached']} / {check['first_crossing']['uncached']}",
                        "—" if reached is None else f"{reached['step']} in {reached['s']:.1f} s",
                    ]
                )
    if checks:
        lines += [
            "Cached vs uncached curves of the same seed (the derived uncached times assume they coincide):",
            "",
            md_table(
                [
                    "size",
                    "N",
                    "variant",
                    "seed",
                    "evals",
                    "max abs Δ accuracy (pts)",
                    "first at target (cached / uncached)",
                ]
                + ["uncached reach and hold (measured)"],
                checks,
                numeric_from=3,
            ),
            "",
        ]
    return lines


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = data["groups"]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5 * max(1, len(groups)), 4), squeeze=False)
    for ax, group in zip(axes[0], groups, strict=False):
        for key, key_runs in group["runs"].items():
            curves = [run["curve"] for run in key_runs]
            times = [statistics.fmean(c[i]["train_s"] for c in curves) for i in range(len(curves[0]))]
            accs = [100 * statistics.fmean(c[i]["accuracy"] for c in curves) for i in range(len(curves[0]))]
            ax.plot(times, accs, label=key)
        ax.axhline(100 * group["target"], color="grey", linestyle=":", label="target")
        ax.set_title(f"{group['size']}², last {group['n']} convs (mean over seeds)")
        ax.set_xlabel("training wall clock (s)")
        ax.set_ylabel("test accuracy (%)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------
# A reduced run outside the two profiles
# --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m benchmarks.convergence --sizes 64 --layers 4 --patch-sizes 2 --seeds 5 --steps 200`."""
    from .cli import _log
    from .common import Suite, available_cores, machine_info, write_suite_outputs

    full = SETTINGS["full"]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.convergence", description=main.__doc__)
    parser.add_argument("--sizes", default="64")
    parser.add_argument("--layers", default="4")
    parser.add_argument("--patch-sizes", default="2")
    parser.add_argument("--seeds", type=int, default=len(full.seeds))
    parser.add_argument("--steps", type=int, default=full.steps)
    parser.add_argument("--eval-every", type=int, default=full.eval_every)
    parser.add_argument("--snr-batches", type=int, default=full.snr_batches, help="0: no gradient SNR")
    parser.add_argument(
        "--feature-cache",
        action=argparse.BooleanOptionalAction,
        default=full.feature_cache,
        help="train and evaluate on cached prefix features",
    )
    parser.add_argument(
        "--uncached-seeds",
        type=int,
        default=full.uncached_seeds,
        help="with --feature-cache: seeds also trained through the whole graph",
    )
    parser.add_argument(
        "--uncached-steps", type=int, default=full.uncached_steps, help="steps of those runs (0: --steps)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(part) for part in text.split(",") if part.strip())

    settings = replace(
        full,
        sizes=ints(args.sizes),
        layers=ints(args.layers),
        patch_sizes=ints(args.patch_sizes),
        seeds=tuple(range(args.seeds)),
        steps=args.steps,
        eval_every=args.eval_every,
        snr_batches=args.snr_batches,
        feature_cache=args.feature_cache,
        uncached_seeds=args.uncached_seeds,
        uncached_steps=args.uncached_steps,
    )
    threads = args.threads or available_cores()
    ctx = SuiteContext(profile="full", out_dir=args.out, threads=threads, log=_log)
    suite = Suite("convergence", "time to accuracy, exact BP vs gradient filtering (reduced run)", run)
    started = time.perf_counter()
    result = run(ctx, settings)
    paths = write_suite_outputs(ctx, suite, result, machine_info(threads), time.perf_counter() - started)
    print(paths["markdown"].read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

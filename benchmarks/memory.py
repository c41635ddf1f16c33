"""Suite `memory`: peak process memory of one training step, compiled artifacts vs PyTorch eager.

Each variant of each configuration (see `training.py`) runs in its own process. The number
is ru_maxrss during the first training step minus its value right after loading (the model,
the optimizer and the batch are in memory by then), with ORT's CPU memory arena off and a
fixed glibc mmap threshold, so it follows the bytes of live tensors. The second step's
peak over the RSS before it is reported too: it leaves out first-step allocations that stay
(gradient buffers, optimizer state) and is the transient working set of a steady step.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import training
from .common import MIB, SuiteContext, SuiteResult, fmt, md_table
from .graph_stats import saved_for_backward

ORT_EXACT, TORCH_EXACT = "ort_exact", "torch_exact"
# Which analytic count applies: the trained convs keep x (exact backward) or x~ (filtered backward).
EXACT_BACKWARD = ("torch_exact", "ort_exact", "ort_tiled")
FILTERED_BACKWARD = ("torch_filtered", "ort_filtered", "ort_tiled_filtered")
# Issue 5's memory goal: filtering + row tiling <= 30% of torch eager exact BP, MobileNetV2 224², batch 32, last 4.
GOAL_CONFIG = ("mobilenet_v2", 224, 32)
GOAL_VARIANT = "ort_tiled_filtered"
GOAL_RATIO = 0.30


def run(ctx: SuiteContext) -> SuiteResult:
    settings = training.SETTINGS[ctx.profile]
    entries = []
    for config in training.selected_configs(ctx, settings):
        prepared = training.prepare(ctx, config, arena_off=True)
        runs = training.run_variants(ctx, prepared, "memory", settings)
        variants = {variant: _summarise(variant_runs) for variant, variant_runs in runs.items()}
        _ratios(variants)
        # What the measured peak cannot say by itself: which forward tensors the ORT backward reads.
        saved = {
            variant: saved_for_backward(path / "training_model.onnx", min_bytes=1)
            for variant, path in prepared.artifacts.items()
        }
        entries.append(
            {
                "config": asdict(config),
                "label": config.label,
                "analytic_totals_batch1": prepared.analytic,
                "compiler": prepared.compiler,
                "saved_for_backward": saved,
                "variants": variants,
            }
        )
        ctx.log(
            f"memory: {config.label}: " + ", ".join(f"{v} {r['step1_delta_mib']:.1f} MiB" for v, r in variants.items())
        )
    data = {
        **training.suite_header(settings, ctx.threads, ctx.repeat),
        "malloc_env": training.MEMORY_ENV,
        "entries": entries,
    }
    data["goal"] = _goal(entries)
    return SuiteResult(data=data, markdown=_markdown(data), plot=lambda path: _plot(data, path))


def _mib(value: int | None) -> float | None:
    return None if value is None else value / MIB


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the repeated processes (and their range) of each memory number, in MiB."""
    step1 = [_mib(run["step1_delta_bytes"]) for run in runs]
    step2 = [_mib(run["step2_delta_bytes"]) for run in runs if run["step2_delta_bytes"] is not None]
    return {
        "step1_delta_mib": statistics.median(step1),
        "step1_delta_range_mib": [min(step1), max(step1)],
        "step2_delta_mib": statistics.median(step2) if step2 else None,
        "step1_delta_no_reset_mib": statistics.median(_mib(run["step1_delta_no_reset_bytes"]) for run in runs),
        "post_load_rss_mib": statistics.median(_mib(run["post_load_rss_bytes"]) for run in runs),
        "hwm_reset": all(run["hwm_reset"] for run in runs),
        "runs": runs,
    }


def _ratios(variants: dict[str, dict[str, Any]]) -> None:
    for result in variants.values():
        for key in ("step1", "step2"):
            value = result[f"{key}_delta_mib"]
            for base in (TORCH_EXACT, ORT_EXACT):
                reference = variants[base][f"{key}_delta_mib"]
                ratio = value / reference if value is not None and reference else None
                result[f"{key}_vs_{base}"] = ratio


def _analytic(entry: dict[str, Any], variant: str) -> tuple[int | None, float | None]:
    """Analytic input-activation bytes of the trained convs (manifest totals): batch 1, and x batch in MiB."""
    totals = entry["analytic_totals_batch1"]
    filtered = [totals[v] for v in ("ort_filtered", "ort_tiled_filtered") if v in totals]
    if variant in EXACT_BACKWARD:
        value = totals["ort_exact"]["vanilla_activation_bytes"]
    elif variant in FILTERED_BACKWARD and filtered:
        value = filtered[0]["compiled_activation_bytes"]
    else:
        return None, None  # checkpointing keeps block inputs, which the table does not model
    return value, value * entry["config"]["batch"] / MIB


def _goal(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The issue's memory goal, from the goal configuration's entry if this run measured it."""
    model, size, batch = GOAL_CONFIG
    goal: dict[str, Any] = {"config": list(GOAL_CONFIG), "variant": GOAL_VARIANT, "max_ratio": GOAL_RATIO}
    for entry in entries:
        config = entry["config"]
        if (config["model"], config["size"], config["batch"]) == GOAL_CONFIG and GOAL_VARIANT in entry["variants"]:
            result = entry["variants"][GOAL_VARIANT]
            goal.update(
                measured=True,
                step1_vs_torch_exact=result["step1_vs_torch_exact"],
                step2_vs_torch_exact=result["step2_vs_torch_exact"],
                met=result["step1_vs_torch_exact"] <= GOAL_RATIO,
            )
            return goal
    goal["measured"] = False
    return goal


def _goal_line(goal: dict[str, Any]) -> str:
    model, size, batch = goal["config"]
    label = training.VARIANT_LABELS[goal["variant"]]
    if not goal["measured"]:
        return f"Goal (peak of {label} ≤ {goal['max_ratio']:.0%} of torch eager exact, {model} {size}² b{batch}): not in this run."
    step2 = goal["step2_vs_torch_exact"]
    return (
        f"Goal: peak training-step memory of {label} ≤ {goal['max_ratio']:.0%} of torch eager exact BP for {model} "
        f"at {size}², batch {batch}, last 4 layers: measured {goal['step1_vs_torch_exact']:.0%} (step 1)"
        + (f", {step2:.0%} (step 2)" if step2 is not None else "")
        + f": **{'met' if goal['met'] else 'missed'}**."
    )


def _markdown(data: dict[str, Any]) -> str:
    headers = [
        "model",
        "input",
        "batch",
        "variant",
        "step 1 peak − post-load MiB",
        "÷ torch exact",
        "÷ ORT exact",
        "step 2 MiB",
        "step 2 ÷ torch exact",
        "step 2 ÷ ORT exact",
        "analytic act. KiB (b=1)",
        "analytic act. × batch MiB",
        "ORT fwd→bwd tensors MiB",
    ]
    rows = []
    for entry in data["entries"]:
        config = entry["config"]
        for variant, result in entry["variants"].items():
            kib, scaled = _analytic(entry, variant)
            low, high = result["step1_delta_range_mib"]
            step1 = fmt(result["step1_delta_mib"], 1)
            if data["repeat"] > 1:
                step1 += f" ({low:.1f}–{high:.1f})"
            rows.append(
                [
                    config["model"],
                    f"{config['size']}²",
                    config["batch"],
                    training.VARIANT_LABELS[variant],
                    step1,
                    fmt(result["step1_vs_torch_exact"]),
                    fmt(result["step1_vs_ort_exact"]),
                    fmt(result["step2_delta_mib"], 1),
                    fmt(result["step2_vs_torch_exact"]),
                    fmt(result["step2_vs_ort_exact"]),
                    fmt(kib / 1024, 1) if kib is not None else "—",
                    fmt(scaled, 2),
                    fmt(entry["saved_for_backward"][variant]["total_bytes"] / MIB, 2)
                    if variant in entry["saved_for_backward"]
                    else "—",
                ]
            )
    resets = all(r["hwm_reset"] for e in data["entries"] for r in e["variants"].values())
    notes = [
        f"One training step (forward + backward + AdamW) of the last {data['train_layers']} convs + head, "
        f"{data['num_classes']} classes, BN in eval mode; ORT filtered uses r={data['patch_size']}. "
        "Each row is a fresh process"
        + (f" ({data['repeat']} processes, median and range)" if data["repeat"] > 1 else "")
        + ". 'step 1 peak − post-load' is ru_maxrss during the first step minus ru_maxrss right after loading "
        "(model, optimizer and batch loaded"
        + ("; the kernel's high-water mark is reset at that point" if resets else "")
        + "). 'step 2' is the second step's peak over the RSS just before it (no first-step allocations such as "
        "gradient buffers or optimizer state). ORT runs with enable_cpu_mem_arena = False; every process runs with "
        + ", ".join(f"{k}={v}" for k, v in data["malloc_env"].items())
        + ". torch allocates gradients and AdamW state in its first step and frees the gradients at the start "
        "of the next (zero_grad(set_to_none=True)), ORT allocates both when loading: compare ORT with torch "
        "on 'step 2' rather than 'step 1', and note that torch's 'step 2' starts after its gradients are freed. "
        "Ratios are variant ÷ baseline (below 1 = less memory). 'analytic act.' is the manifest's "
        "layers.totals: fp32 input activations of the trained convs (vanilla for exact, x~ for filtered). "
        f"(f) and (g) run the frozen prefix's conv chains in {data['row_tiles']} row bands (`--row-tiles "
        f"{data['row_tiles']}`, OverL); their artifacts also turn off ORT's memory pattern and buffer reuse.",
        "",
        md_table(headers, rows, numeric_from=2, text_columns=(3,)),
        "",
        _goal_line(data["goal"]),
        "",
        "'ORT fwd→bwd tensors' is static: the bytes of every forward tensor that a backward node of the "
        "compiled training graph reads (what ORT must keep from the forward into the backward; weight-only "
        "results such as the filter's W~ count too, since they do not depend on a gradient).",
        "",
        training.compiler_note(data["entries"]),
        "",
        _kept_tensors(data["entries"]),
    ]
    return "\n".join(notes)


def _kept_tensors(entries: list[dict[str, Any]], top: int = 6) -> str:
    """The largest forward tensors the ORT backward reads, per model at its largest batch."""
    largest: dict[str, dict[str, Any]] = {}
    for entry in entries:
        model = entry["config"]["model"]
        if model not in largest or entry["config"]["batch"] > largest[model]["config"]["batch"]:
            largest[model] = entry
    headers = ["config", "variant", "tensor", "shape", "MiB", "read by"]
    rows = []
    for entry in largest.values():
        for variant, saved in entry["saved_for_backward"].items():
            for tensor in saved["tensors"][:top]:
                readers = sorted({reader.split()[0] for reader in tensor["readers"]})
                rows.append(
                    [
                        entry["label"],
                        training.VARIANT_LABELS[variant],
                        f"`{tensor['name']}`",
                        "×".join(str(d) for d in tensor["shape"] or []),
                        fmt((tensor["bytes"] or 0) / MIB, 2),
                        ", ".join(readers),
                    ]
                )
    return f"Largest forward tensors read by the ORT backward (top {top} per variant):\n\n" + md_table(
        headers, rows, numeric_from=4, text_columns=(5,)
    )


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    entries = data["entries"]
    variants = list(entries[0]["variants"]) if entries else []
    x = np.arange(len(entries))
    width = 0.8 / max(len(variants), 1)
    fig, axes = plt.subplots(1, 2, figsize=(14, 4.5))
    for ax, key, title in zip(
        axes, ("step1", "step2"), ("step 1 peak − post-load", "step 2 peak − pre-step RSS"), strict=True
    ):
        for i, variant in enumerate(variants):
            values = [entry["variants"][variant][f"{key}_delta_mib"] or 0.0 for entry in entries]
            offset = (i - (len(variants) - 1) / 2) * width
            ax.bar(x + offset, values, width, label=training.VARIANT_LABELS[variant])
        ax.set_xticks(x, [entry["label"] for entry in entries], fontsize=8)
        ax.set_ylabel("MiB")
        ax.set_title(title)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

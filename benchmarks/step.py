"""Suite `step`: median training-step time, compiled artifacts vs PyTorch eager.

Same configurations and variants as `memory` (see `training.py`), each in its own process,
with ORT's memory arena on (as compiled) and torch threads = ORT intra-op threads = cores.
A step is forward + backward + optimizer; the time is the median after warm-up steps.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import training
from .common import SuiteContext, SuiteResult, fmt, md_table


def run(ctx: SuiteContext) -> SuiteResult:
    settings = training.SETTINGS[ctx.profile]
    entries = []
    for config in training.selected_configs(ctx, settings):
        prepared = training.prepare(ctx, config, arena_off=False)
        runs = training.run_variants(ctx, prepared, "step", settings)
        variants = {variant: _summarise(variant_runs) for variant, variant_runs in runs.items()}
        for result in variants.values():
            # Speed-up = baseline time / variant time (above 1 = faster than the baseline).
            result["speedup_vs_torch_exact"] = variants["torch_exact"]["median_s"] / result["median_s"]
            result["speedup_vs_ort_exact"] = variants["ort_exact"]["median_s"] / result["median_s"]
        entries.append(
            {"config": asdict(config), "label": config.label, "compiler": prepared.compiler, "variants": variants}
        )
        ctx.log(f"step: {config.label}: " + ", ".join(f"{v} {r['median_s'] * 1e3:.0f} ms" for v, r in variants.items()))
    data = {**training.suite_header(settings, ctx.threads, ctx.repeat), "entries": entries}
    return SuiteResult(data=data, markdown=_markdown(data), plot=lambda path: _plot(data, path))


def _summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    medians = [run["stats"]["median_s"] for run in runs]
    median = statistics.median(medians)
    return {
        "median_s": median,
        "run_medians_s": medians,
        "run_spread_rel": (max(medians) - min(medians)) / median,
        "iqr_rel": max(run["stats"]["iqr_rel"] for run in runs),
        "reps": [run["stats"]["n"] for run in runs],
        "runs": runs,
    }


def _markdown(data: dict[str, Any]) -> str:
    headers = [
        "model",
        "input",
        "batch",
        "variant",
        "median step ms",
        "IQR ÷ median",
        "× vs torch exact",
        "× vs ORT exact",
    ]
    if data["repeat"] > 1:
        headers.insert(6, "process spread")
    rows = []
    for entry in data["entries"]:
        config = entry["config"]
        for variant, result in entry["variants"].items():
            row = [
                config["model"],
                f"{config['size']}²",
                config["batch"],
                training.VARIANT_LABELS[variant],
                fmt(result["median_s"] * 1e3, 1),
                f"{result['iqr_rel']:.0%}",
                fmt(result["speedup_vs_torch_exact"]),
                fmt(result["speedup_vs_ort_exact"]),
            ]
            if data["repeat"] > 1:
                row.insert(6, f"{result['run_spread_rel']:.0%}")
            rows.append(row)
    every = [r for e in data["entries"] for r in e["variants"].values()]
    notes = [
        f"Median time of one training step (forward + backward + AdamW) of the last {data['train_layers']} convs "
        f"+ head, {data['num_classes']} classes, BN in eval mode, after {data['settings']['warmup']} warm-up "
        f"steps; at least {data['settings']['min_reps']} timed steps and {data['settings']['min_time_s']:.0f} s "
        f"per process; each row is a fresh process ({data['repeat']} per row). ORT filtered uses "
        f"r={data['patch_size']}; ORT's memory arena is on, except for the row-tiled (f) and (g), whose artifacts "
        "turn off the arena, the memory pattern and buffer reuse (what `gfcompile --row-tiles` records for "
        "them). '×' = baseline time ÷ variant time (above 1 = faster).",
        "",
        md_table(headers, rows, numeric_from=2, text_columns=(3,)),
        "",
        training.compiler_note(data["entries"]),
        "",
        f"Noise: interquartile range ÷ median of the timed steps, median "
        f"{statistics.median(r['iqr_rel'] for r in every):.1%}, worst {max(r['iqr_rel'] for r in every):.1%}.",
    ]
    return "\n".join(notes)


def _plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    entries = data["entries"]
    variants = list(entries[0]["variants"]) if entries else []
    x = np.arange(len(entries))
    width = 0.8 / max(len(variants), 1)
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for i, variant in enumerate(variants):
        values = [entry["variants"][variant]["median_s"] * 1e3 for entry in entries]
        offset = (i - (len(variants) - 1) / 2) * width
        ax.bar(x + offset, values, width, label=training.VARIANT_LABELS[variant])
    ax.set_xticks(x, [entry["label"] for entry in entries], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("median step time, ms")
    ax.set_title(f"training step, {data['threads']} threads")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

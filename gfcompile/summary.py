"""The per-layer cost table (the gradient-filtering paper's definitions), printed and kept in the manifest.

Memory: fp32 bytes of the trained conv layers' input activations at batch 1.
FLOPs: backward FLOPs of the trained conv layers at batch 1 (see `passes.geometry.filtered_cost`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from passes.base import Plan
from passes.geometry import filtered_cost


def layer_costs(plan: Plan) -> list[dict]:
    rows = []
    for position, name in enumerate(plan.trainable_convs):
        layer = plan.conv(name)
        needs_grad_x = position > 0  # backprop stops at the first trainable conv
        r = plan.filtered.get(name)
        cost = filtered_cost(layer, r or 1, grad_x=needs_grad_x)
        row = {
            "layer": name,
            "weight": layer.weight,
            "r": r,
            "input_shape": list(layer.x_shape[1:]),
            "output_shape": list(layer.y_shape[1:]),
            "vanilla_activation_bytes": cost["vanilla_activation_bytes"],
            "vanilla_backward_flops": cost["vanilla_backward_flops"],
        }
        row["compiled_activation_bytes"] = cost["filtered_activation_bytes"] if r else row["vanilla_activation_bytes"]
        row["compiled_backward_flops"] = cost["filtered_backward_flops"] if r else row["vanilla_backward_flops"]
        rows.append(row)
    return rows


def totals(rows: list[dict]) -> dict:
    keys = (
        "vanilla_activation_bytes",
        "compiled_activation_bytes",
        "vanilla_backward_flops",
        "compiled_backward_flops",
    )
    return {key: sum(row[key] for row in rows) for key in keys}


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'layer':<44} {'r':>3} {'act vanilla':>12} {'act compiled':>12} {'bwd MFLOP van':>14} {'bwd MFLOP comp':>14}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['weight'][:44]:<44} {row['r'] or '-':>3} {_kib(row['vanilla_activation_bytes']):>12} "
            f"{_kib(row['compiled_activation_bytes']):>12} {row['vanilla_backward_flops'] / 1e6:>14.2f} "
            f"{row['compiled_backward_flops'] / 1e6:>14.2f}"
        )
    total = totals(rows)
    lines.append("-" * len(header))
    mem_ratio = total["vanilla_activation_bytes"] / max(total["compiled_activation_bytes"], 1)
    flop_ratio = total["vanilla_backward_flops"] / max(total["compiled_backward_flops"], 1)
    lines.append(
        f"{'total (batch 1)':<44} {'':>3} {_kib(total['vanilla_activation_bytes']):>12} "
        f"{_kib(total['compiled_activation_bytes']):>12} {total['vanilla_backward_flops'] / 1e6:>14.2f} "
        f"{total['compiled_backward_flops'] / 1e6:>14.2f}"
    )
    if any(row["r"] for row in rows):
        lines.append(f"activation memory {mem_ratio:.1f}x smaller, backward FLOPs {flop_ratio:.1f}x fewer")
    else:
        lines.append("no gradient-filtered layers: compiled costs equal vanilla")
    lines += patch_coverage_warnings(
        (row["weight"].removesuffix(".weight"), row["r"], row["output_shape"]) for row in rows
    )
    return "\n".join(lines)


def covers_half_map(r: int | None, output_shape: Sequence[int]) -> bool:
    """An r x r patch spans at least half the (C x) H x W output map on both axes: at most 2 x 2 patches.

    r = 1 is exact backprop and never counts. This is the regime where fine-tuning with filtered
    gradients lost accuracy in our measurements (2x2 and 4x4 maps with r = 2, README, Accuracy).
    """
    if r is None or r <= 1:
        return False
    height, width = output_shape[-2:]
    return 2 * r >= height and 2 * r >= width


def patch_coverage_warnings(layers: Iterable[tuple[str, int | None, Sequence[int]]]) -> list[str]:
    """One warning per (name, r, output shape) whose patches cover half its map or more, with what to use instead."""
    warnings = []
    for name, r, output_shape in layers:
        if not covers_half_map(r, output_shape):
            continue
        height, width = output_shape[-2:]
        # The largest r with 2r < H and 2r < W (3 or more patches per axis); 1 means: keep this layer exact.
        smaller = max(1, (min(height, width) - 1) // 2)
        remedy = f"r <= {smaller}" if smaller > 1 else "exact backprop (r = 1) for it"
        warnings.append(
            f"warning: {name}: r={r} patches cover half or more of its {height}x{width} output map, where "
            f"filtered fine-tuning lost accuracy in our measurements; use {remedy} "
            f'(--patch-size-map with {{"{name}": {smaller}}}), a smaller --patch-size or a larger input'
        )
    return warnings


def _kib(count: int) -> str:
    return f"{count / 1024:.1f} KiB"

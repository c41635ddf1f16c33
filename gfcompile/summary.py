"""The per-layer cost table (the gradient-filtering paper's definitions), printed and kept in the manifest.

Memory: fp32 bytes of the trained conv layers' input activations at batch 1.
FLOPs: backward FLOPs of the trained conv layers at batch 1 (see `passes.geometry.filtered_cost`).
"""

from __future__ import annotations

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
    return "\n".join(lines)


def _kib(count: int) -> str:
    return f"{count / 1024:.1f} KiB"

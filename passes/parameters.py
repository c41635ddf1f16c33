"""Which op inputs hold a layer's parameters, and how a weight may reach them. Not a pass.

The planner (gfcompile/planning.py) decides from these which initializers train;
untie_parameters uses the same tables to give every such use its own tensor; the backward
builder and `gfcompile diff` read PARAMETER_INPUTS for the compiled graph.
"""

from __future__ import annotations

# Inputs (by position) of an op that are learnable parameters when they are initializers.
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "PRelu": (1,),
}
# In the source model, a float initializer operand of these is a parameter as much as a Conv bias
# is: a Linear on a channels-last tensor exports as MatMul + Add(bias), ConvNeXt's layer_scale is a
# Mul. (Passes add Mul/Add constants later, e.g. bn_eval_affine; only the planner and untie, which
# see the source model, read this table.)
AFFINE_OPERAND_INPUTS: dict[str, tuple[int, ...]] = {"Add": (0, 1), "Mul": (0, 1)}
# BatchNormalization's running mean and variance: model state that never trains.
BN_STATISTICS_INPUTS = (3, 4)

# Ops that pass a tensor's values through unchanged up to layout, shape or type: a weight that
# reaches a parameter input through a chain of these (convnext's Linear weight through a
# Transpose before its MatMul) is still that layer's parameter. Each op's data is its input 0.
VIEW_OPS = frozenset({"Identity", "Transpose", "Reshape", "Cast", "Unsqueeze", "Squeeze", "Flatten"})


def parameter_slots(op_type: str) -> tuple[int, ...]:
    """Inputs of `op_type` in a source model that are a layer's learnable parameters when initializers."""
    return PARAMETER_INPUTS.get(op_type, ()) + AFFINE_OPERAND_INPUTS.get(op_type, ())


def state_slots(op_type: str) -> tuple[int, ...]:
    """Inputs of `op_type` that hold layer state: its parameters, and BN's running statistics."""
    slots = parameter_slots(op_type)
    return slots + BN_STATISTICS_INPUTS if op_type == "BatchNormalization" else slots

"""The explicit table of gradient rules, and which inputs of an op carry gradient.

A rule is `rule(ctx, node, dys, wrt) -> dxs`: given the gradients of the node's outputs
(None where no gradient flows) and which inputs need one, it emits nodes and returns the
input gradients' names (None where not needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import onnx

from .context import RuleContext
from .rules import (
    activations,
    elementwise,
    linear,
    normalization,
    pooling,
    reduction,
    resize,
    shape,
)

Rule = Callable[[RuleContext, onnx.NodeProto, Sequence[str | None], Sequence[bool]], list[str | None]]

RULES: dict[str, Rule] = {
    # element-wise arithmetic, broadcasting
    "Add": elementwise.add,
    "Sub": elementwise.sub,
    "Mul": elementwise.mul,
    "Div": elementwise.div,
    "Neg": elementwise.neg,
    "Sum": elementwise.sum_,
    "Identity": elementwise.identity,
    "Dropout": elementwise.identity,
    "Cast": elementwise.cast,
    "Pow": elementwise.pow_,
    "Sqrt": elementwise.sqrt,
    "Exp": elementwise.exp,
    "Log": elementwise.log,
    "Reciprocal": elementwise.reciprocal,
    # activations
    "Relu": activations.relu,
    "LeakyRelu": activations.leaky_relu,
    "PRelu": activations.prelu,
    "Clip": activations.clip,
    "Sigmoid": activations.sigmoid,
    "HardSigmoid": activations.hard_sigmoid,
    "HardSwish": activations.hard_swish,
    "Tanh": activations.tanh,
    "Erf": activations.erf,
    "Gelu": activations.gelu,
    "Softmax": activations.softmax,
    "LogSoftmax": activations.log_softmax,
    # linear algebra and convolution
    "Gemm": linear.gemm,
    "MatMul": linear.matmul,
    "Conv": linear.conv,
    "ConvTranspose": linear.conv_transpose,
    # normalisation
    "BatchNormalization": normalization.batch_norm,
    "LayerNormalization": normalization.layer_norm,
    # pooling
    "GlobalAveragePool": pooling.global_average_pool,
    "GlobalMaxPool": pooling.global_max_pool,
    "AveragePool": pooling.average_pool,
    "MaxPool": pooling.max_pool,
    # reductions
    "ReduceMean": reduction.reduce_mean,
    "ReduceSum": reduction.reduce_sum,
    # shape and data movement
    "Flatten": shape.reshape_back,
    "Reshape": shape.reshape_back,
    "Squeeze": shape.reshape_back,
    "Unsqueeze": shape.reshape_back,
    "Transpose": shape.transpose,
    "Concat": shape.concat,
    "Split": shape.split,
    "Slice": shape.slice_,
    "Gather": shape.gather,
    "Pad": shape.pad,
    "Resize": resize.resize,
}

# Inputs that carry gradient, where not all of them do. Ops listed with () carry none:
# their outputs are shapes, indices or booleans, constants as far as gradients go.
_DIFFERENTIABLE: dict[str, tuple[int, ...]] = {
    "Reshape": (0,),
    "Expand": (0,),
    "Slice": (0,),
    "Pad": (0,),
    "Resize": (0,),
    "Upsample": (0,),
    "Tile": (0,),
    "Gather": (0,),
    "GatherElements": (0,),
    "Squeeze": (0,),
    "Unsqueeze": (0,),
    "Split": (0,),
    "ReduceMean": (0,),
    "ReduceSum": (0,),
    "ReduceMax": (0,),
    "ReduceMin": (0,),
    "Clip": (0,),
    "Where": (1, 2),
    "TopK": (0,),
    "Dropout": (0,),
    "Cast": (0,),
    "BatchNormalization": (0,),
    "LayerNormalization": (0, 1, 2),
    "Shape": (),
    "Size": (),
    "ConstantOfShape": (),
    "Constant": (),
    "Range": (),
    "NonZero": (),
    "ArgMax": (),
    "ArgMin": (),
    "Equal": (),
    "Greater": (),
    "GreaterOrEqual": (),
    "Less": (),
    "LessOrEqual": (),
    "Not": (),
    "And": (),
    "Or": (),
    "Xor": (),
    "NonMaxSuppression": (),
    "OneHot": (),
    "EyeLike": (),
    "RandomNormalLike": (),
    "RandomUniformLike": (),
    "Floor": (),
    "Ceil": (),
    "Round": (),
    "Sign": (),
}


def differentiable_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    """Indices of the node's inputs through which a gradient can flow."""
    fixed = _DIFFERENTIABLE.get(node.op_type)
    if fixed is not None:
        return fixed
    return tuple(range(len(node.input)))

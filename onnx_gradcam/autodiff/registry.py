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
    einsum,
    elementwise,
    fold,
    linear,
    normalization,
    pooling,
    quantization,
    recurrent,
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
    # int8: quantizers (clipped straight-through), integer and QLinear ops (their float forms)
    "QuantizeLinear": quantization.quantize_linear,
    "DequantizeLinear": quantization.dequantize_linear,
    "DynamicQuantizeLinear": quantization.dynamic_quantize_linear,
    "ConvInteger": quantization.conv_integer,
    "MatMulInteger": quantization.matmul_integer,
    "QLinearConv": quantization.qlinear_conv,
    "QLinearMatMul": quantization.qlinear_matmul,
    "com.microsoft.QGemm": quantization.qgemm,
    "com.microsoft.QLinearAdd": quantization.qlinear_add,
    "com.microsoft.QLinearMul": quantization.qlinear_mul,
    "com.microsoft.QLinearGlobalAveragePool": quantization.qlinear_global_average_pool,
    "com.microsoft.QLinearAveragePool": quantization.qlinear_average_pool,
    "com.microsoft.QLinearConcat": quantization.qlinear_concat,
    "com.microsoft.QLinearSigmoid": quantization.qlinear_sigmoid,
    "com.microsoft.QLinearLeakyRelu": quantization.qlinear_leaky_relu,
    "com.microsoft.QLinearSoftmax": quantization.qlinear_softmax,
}

# -- rules-b: normalisations over the sample, depth <-> space, Col2Im, TopK (issue 12) --------
RULES.update(
    {
        "InstanceNormalization": normalization.instance_norm,
        "GroupNormalization": normalization.group_norm,
        "MeanVarianceNormalization": normalization.mean_variance_norm,
        "DepthToSpace": shape.depth_to_space,
        "SpaceToDepth": shape.space_to_depth,
        "Col2Im": fold.col2im,
        "TopK": shape.top_k,
    }
)
# -- end rules-b ---------------------------------------------------------------------------

# -- maxpool branch: local response normalisation (MaxPool's masks below opset 16 live in its rule)
RULES.update({"LRN": normalization.lrn})
# -- end maxpool branch

# -- recurrent ops (LSTM, GRU, RNN): input sequence and initial states --------------------------
RULES.update(
    {
        "LSTM": recurrent.lstm,
        "GRU": recurrent.gru,
        "RNN": recurrent.rnn,
    }
)
# -- end recurrent ops ---------------------------------------------------------------------------

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
    "QuantizeLinear": (0,),
    "DequantizeLinear": (0,),
    "DynamicQuantizeLinear": (0,),
    "ConvInteger": (0,),
    "MatMulInteger": (0, 1),
    "QLinearConv": (0,),
    "QLinearMatMul": (0, 3),
    "com.microsoft.QGemm": (0,),
    "com.microsoft.QLinearAdd": (0, 3),
    "com.microsoft.QLinearMul": (0, 3),
    "com.microsoft.QLinearGlobalAveragePool": (0,),
    "com.microsoft.QLinearAveragePool": (0,),
    "com.microsoft.QLinearSigmoid": (0,),
    "com.microsoft.QLinearLeakyRelu": (0,),
    "com.microsoft.QLinearSoftmax": (0,),
}
# -- rules-b: Col2Im's image and block shapes are shapes; ops whose outputs are piecewise
# constant (Hardmax), booleans, integers or random carry no gradient: a score after one of them
# is an error that names it (surgery/layers.py::check_differentiable)
_DIFFERENTIABLE["Col2Im"] = (0,)
_DIFFERENTIABLE.update(
    dict.fromkeys(
        (
            "Hardmax",
            "IsNaN",
            "IsInf",
            "BitShift",
            "BitwiseAnd",
            "BitwiseOr",
            "BitwiseXor",
            "BitwiseNot",
            "RandomNormal",
            "RandomUniform",
            "Multinomial",
            "Bernoulli",
        ),
        (),
    )
)
# -- end rules-b ---------------------------------------------------------------------------


# -- issue 12, rules-a: element-wise extrema, activations, reductions, broadcasting copies,
# GatherElements and Einsum ---------------------------------------------------------------
RULES.update(
    {
        "Max": elementwise.max_,
        "Min": elementwise.min_,
        "Abs": elementwise.abs_,
        "Where": elementwise.where,
        "Expand": shape.expand,
        "Tile": shape.tile,
        "GatherElements": shape.gather_elements,
        "Einsum": einsum.einsum,
        "Softplus": activations.softplus,
        "Mish": activations.mish,
        "Elu": activations.elu,
        "Selu": activations.selu,
        "Celu": activations.celu,
        "Softsign": activations.softsign,
        "ThresholdedRelu": activations.thresholded_relu,
        "ReduceMax": reduction.reduce_max,
        "ReduceMin": reduction.reduce_min,
        "ReduceL2": reduction.reduce_l2,
        "ReduceLogSumExp": reduction.reduce_log_sum_exp,
    }
)
_DIFFERENTIABLE.update({"ReduceL2": (0,), "ReduceLogSumExp": (0,)})
# -- end of rules-a ------------------------------------------------------------------------


def rule_key(node: onnx.NodeProto) -> str:
    """The table's key of a node: its op type, prefixed by its domain outside ai.onnx."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def rule_for(node: onnx.NodeProto) -> Rule | None:
    return RULES.get(rule_key(node))


def differentiable_inputs(node: onnx.NodeProto) -> tuple[int, ...]:
    """Indices of the node's inputs through which a gradient can flow."""
    key = rule_key(node)
    if key == "com.microsoft.QLinearConcat":  # (s_y, zp_y, then X_i, s_i, zp_i triples)
        return tuple(range(2, len(node.input), 3))
    fixed = _DIFFERENTIABLE.get(key)
    if fixed is not None:
        return fixed
    return tuple(range(len(node.input)))

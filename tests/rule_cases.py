"""The finite-difference cases of every gradient rule, keyed by op type.

Each case is one node (plus constant inputs); the test harness differentiates it with the
engine and compares with central differences of the same node run in onnxruntime.
float64 where onnxruntime implements the op in double, else float32 (looser tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

F64 = np.float64
F32 = np.float32


@dataclass
class Case:
    id: str
    inputs: list[tuple[str, Any, bool]]  # (name, value, is_constant); value None = absent input
    attrs: dict[str, Any] = field(default_factory=dict)
    wrt: tuple[str, ...] = ("x",)
    opset: int = 17
    outputs: int = 1
    dtype: Any = F64
    symbolic: tuple[int, ...] = ()  # axes of the inputs declared with symbolic (dynamic) sizes
    # int8 ops: the op in float64 with straight-through requantization, f(inputs, onnxruntime's
    # outputs) -> outputs; differentiated instead of onnxruntime (see INT8_CASES)
    surrogate: Any = None
    exact: bool = True  # False: onnxruntime rounds in integer arithmetic (its output within 1)


def rnd(*shape: int, seed: int = 0, lo: float = -1.0, hi: float = 1.0, away: float = 0.0) -> np.ndarray:
    """Uniform values; `away` keeps them at least that far from 0 (kinks of Relu-like ops)."""
    r = np.random.RandomState(seed + 7 * len(shape) + sum(shape))
    v = r.uniform(lo, hi, size=shape)
    if away:
        v = np.where(np.abs(v) < away, np.sign(v + 1e-12) * (away + np.abs(v)), v)
    return v


def distinct(*shape: int, seed: int = 0) -> np.ndarray:
    """A permutation of well separated values (no ties for max pooling)."""
    n = int(np.prod(shape))
    r = np.random.RandomState(seed)
    return (r.permutation(n).astype(np.float64) / n - 0.5).reshape(shape) * 4


def i64(*v: int) -> np.ndarray:
    return np.array(v, np.int64)


def x_(v: np.ndarray, name: str = "x") -> tuple[str, Any, bool]:
    return (name, v, False)


def c_(name: str, v: Any) -> tuple[str, Any, bool]:
    return (name, v, True)


NONE = ("", None, True)

CASES: dict[str, list[Case]] = {
    "Add": [
        Case("same_shape", [x_(rnd(2, 3, 4)), x_(rnd(2, 3, 4, seed=1), "b")], wrt=("x", "b")),
        Case("broadcast", [x_(rnd(2, 3, 4)), x_(rnd(3, 1, seed=1), "b")], wrt=("x", "b")),
        Case("broadcast_lead", [x_(rnd(1, 4)), x_(rnd(2, 3, 4, seed=1), "b")], wrt=("x", "b")),
    ],
    "Sub": [Case("broadcast", [x_(rnd(2, 3, 4)), x_(rnd(1, 3, 1, seed=1), "b")], wrt=("x", "b"))],
    "Mul": [
        Case("squeeze_excite", [x_(rnd(2, 3, 4, 4)), x_(rnd(2, 3, 1, 1, seed=1), "b")], wrt=("x", "b")),
        Case("constant", [x_(rnd(2, 3)), c_("b", rnd(3, seed=2))]),
    ],
    "Div": [
        Case("broadcast", [x_(rnd(2, 3, 4)), x_(rnd(3, 1, seed=1, lo=0.5, hi=2.0), "b")], wrt=("x", "b")),
    ],
    "Neg": [Case("plain", [x_(rnd(2, 5))])],
    "Sum": [Case("three", [x_(rnd(2, 3)), x_(rnd(3, seed=1), "b"), x_(rnd(2, 1, seed=2), "c")], wrt=("x", "b", "c"))],
    "Identity": [Case("plain", [x_(rnd(2, 3))])],
    "Dropout": [Case("inference", [x_(rnd(2, 3))], opset=13)],
    "Cast": [Case("to_double", [x_(rnd(2, 3).astype(F32))], attrs={"to": 11}, dtype=F32)],
    "Pow": [
        Case("cube", [x_(rnd(2, 3)), c_("p", np.array(3.0))]),
        Case("sqrt_like", [x_(rnd(2, 3, lo=0.5, hi=2.0)), c_("p", np.array(0.5))]),
    ],
    "Sqrt": [Case("plain", [x_(rnd(2, 3, lo=0.5, hi=2.0))])],
    "Exp": [Case("plain", [x_(rnd(2, 3))])],
    "Log": [Case("plain", [x_(rnd(2, 3, lo=0.5, hi=2.0))])],
    "Reciprocal": [Case("plain", [x_(rnd(2, 3, lo=0.5, hi=2.0))])],
    "Relu": [Case("plain", [x_(rnd(2, 3, 4, away=0.05))])],
    "LeakyRelu": [Case("alpha", [x_(rnd(2, 3, 4, away=0.05))], attrs={"alpha": 0.2}, dtype=F32)],
    "PRelu": [
        Case(
            "channel_slope", [x_(rnd(2, 3, 4, 4, away=0.05)), x_(rnd(3, 1, 1, seed=3), "s")], wrt=("x", "s"), dtype=F32
        )
    ],
    "Clip": [
        Case("relu6", [x_(rnd(2, 3, 4, lo=-2, hi=8, away=0.05)), c_("lo", np.array(0.0)), c_("hi", np.array(6.0))]),
        Case("min_only", [x_(rnd(2, 3, 4, away=0.05)), c_("lo", np.array(0.0)), NONE]),
    ],
    "Sigmoid": [Case("plain", [x_(rnd(2, 3, lo=-3, hi=3))])],
    "HardSigmoid": [
        Case("default", [x_(rnd(2, 3, 4, lo=-4, hi=4, away=0.05))], dtype=F32),
        Case("torch_form", [x_(rnd(2, 3, 4, lo=-4, hi=4, away=0.05))], attrs={"alpha": 1 / 6, "beta": 0.5}, dtype=F32),
    ],
    "HardSwish": [Case("plain", [x_(rnd(2, 3, 4, lo=-5, hi=5, away=0.05))], opset=14, dtype=F32)],
    "Tanh": [Case("plain", [x_(rnd(2, 3, lo=-2, hi=2))])],
    "Erf": [Case("plain", [x_(rnd(2, 3, lo=-2, hi=2))], dtype=F32)],
    "Gelu": [
        Case("exact", [x_(rnd(2, 3, lo=-3, hi=3))], opset=20, dtype=F32),
        Case("tanh", [x_(rnd(2, 3, lo=-3, hi=3))], attrs={"approximate": "tanh"}, opset=20, dtype=F32),
    ],
    "Softmax": [
        Case("last_axis", [x_(rnd(2, 5))]),
        Case("axis1_rank3", [x_(rnd(2, 3, 4))], attrs={"axis": 1}),
    ],
    "LogSoftmax": [Case("last_axis", [x_(rnd(2, 5))]), Case("axis_neg2", [x_(rnd(2, 3, 4))], attrs={"axis": -2})],
    "Gemm": [
        Case("transB_const", [x_(rnd(2, 4)), c_("w", rnd(3, 4, seed=1)), c_("c", rnd(3, seed=2))], attrs={"transB": 1}),
        Case(
            "transA_alpha_beta",
            [x_(rnd(4, 2)), x_(rnd(4, 3, seed=1), "w"), x_(rnd(1, 3, seed=2), "c")],
            attrs={"transA": 1, "alpha": 0.7, "beta": 1.3},
            wrt=("x", "w", "c"),
        ),
        Case(
            "transB_variable",
            [x_(rnd(2, 4)), x_(rnd(3, 4, seed=1), "w")],
            attrs={"transB": 1, "alpha": 2.0},
            wrt=("x", "w"),
        ),
    ],
    "MatMul": [
        Case("const_weight", [x_(rnd(2, 4)), c_("w", rnd(4, 3, seed=1))]),
        Case("batched_broadcast", [x_(rnd(2, 3, 4)), x_(rnd(4, 5, seed=1), "w")], wrt=("x", "w")),
        Case("rank4", [x_(rnd(2, 2, 3, 4)), x_(rnd(2, 1, 4, 2, seed=1), "w")], wrt=("x", "w")),
    ],
    "Conv": [
        Case(
            "symbolic_batch",
            [x_(rnd(2, 3, 7, 6)), c_("w", rnd(4, 3, 3, 3, seed=1))],
            attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]},
            dtype=F32,
            symbolic=(0,),
        ),
        Case(
            "stride2_pads",
            [x_(rnd(2, 3, 7, 6)), c_("w", rnd(4, 3, 3, 3, seed=1)), c_("b", rnd(4, seed=2))],
            attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]},
            dtype=F32,
        ),
        Case(
            "dilation_groups",
            [x_(rnd(1, 4, 8, 8)), c_("w", rnd(6, 2, 3, 3, seed=1))],
            attrs={"dilations": [2, 1], "group": 2, "pads": [2, 1, 2, 1]},
            dtype=F32,
        ),
        Case(
            "depthwise_stride",
            [x_(rnd(1, 3, 9, 9)), c_("w", rnd(3, 1, 3, 3, seed=1))],
            attrs={"group": 3, "strides": [2, 2], "pads": [1, 1, 1, 1]},
            dtype=F32,
        ),
        Case(
            "same_upper",
            [x_(rnd(1, 2, 7, 7)), c_("w", rnd(3, 2, 4, 4, seed=1))],
            attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]},
            dtype=F32,
        ),
        Case(
            "same_lower",
            [x_(rnd(1, 2, 6, 6)), c_("w", rnd(3, 2, 2, 2, seed=1))],
            attrs={"auto_pad": "SAME_LOWER"},
            dtype=F32,
        ),
        Case(
            "valid_stride3",
            [x_(rnd(1, 2, 8, 8)), c_("w", rnd(2, 2, 2, 2, seed=1))],
            attrs={"auto_pad": "VALID", "strides": [3, 3]},
            dtype=F32,
        ),
        Case(
            "conv1d",
            [x_(rnd(2, 3, 11)), c_("w", rnd(4, 3, 3, seed=1))],
            attrs={"strides": [2], "pads": [1, 1]},
            dtype=F32,
        ),
        Case(
            "dynamic_spatial",
            [x_(rnd(2, 3, 7, 6)), c_("w", rnd(4, 3, 3, 3, seed=1))],
            attrs={"strides": [2, 2], "pads": [1, 0, 0, 1]},
            dtype=F32,
            symbolic=(0, 2, 3),
        ),
        Case(
            "dynamic_spatial_dilated",
            [x_(rnd(1, 2, 9, 8)), c_("w", rnd(2, 1, 3, 3, seed=1))],
            attrs={"dilations": [2, 2], "group": 2, "strides": [3, 2], "pads": [2, 2, 2, 2]},
            dtype=F32,
            symbolic=(2, 3),
        ),
        Case(
            "conv3d",
            [x_(rnd(1, 2, 4, 5, 5)), c_("w", rnd(2, 2, 2, 3, 3, seed=1))],
            attrs={"pads": [0, 1, 1, 1, 1, 1]},
            dtype=F32,
        ),
    ],
    "ConvTranspose": [
        Case(
            "stride2",
            [x_(rnd(2, 3, 4, 5)), c_("w", rnd(3, 2, 2, 2, seed=1)), c_("b", rnd(2, seed=2))],
            attrs={"strides": [2, 2]},
            dtype=F32,
        ),
        Case(
            "pads_groups_dilations",
            [x_(rnd(1, 4, 5, 5)), c_("w", rnd(4, 3, 3, 3, seed=1))],
            attrs={"strides": [2, 2], "pads": [1, 0, 1, 2], "group": 2, "dilations": [1, 2], "output_padding": [1, 0]},
            dtype=F32,
        ),
        Case(
            "dynamic_spatial",
            [x_(rnd(2, 3, 4, 5)), c_("w", rnd(3, 2, 3, 3, seed=1))],
            attrs={"strides": [2, 2], "pads": [1, 1, 1, 1]},
            dtype=F32,
            symbolic=(0, 2, 3),
        ),
    ],
    "BatchNormalization": [
        Case(
            "rank4",
            [
                x_(rnd(2, 3, 4, 4)),
                c_("s", rnd(3, seed=1)),
                c_("b", rnd(3, seed=2)),
                c_("m", rnd(3, seed=3)),
                c_("v", rnd(3, seed=4, lo=0.5, hi=2.0)),
            ],
            attrs={"epsilon": 1e-3},
        ),
        Case(
            "rank2",
            [
                x_(rnd(4, 3)),
                c_("s", rnd(3, seed=1)),
                c_("b", rnd(3, seed=2)),
                c_("m", rnd(3, seed=3)),
                c_("v", rnd(3, seed=4, lo=0.5, hi=2.0)),
            ],
        ),
    ],
    "LayerNormalization": [
        Case("last_axis", [x_(rnd(2, 3, 5)), x_(rnd(5, seed=1), "s"), x_(rnd(5, seed=2), "b")], wrt=("x", "s", "b")),
        Case(
            "axis1",
            [x_(rnd(2, 3, 2, 2)), c_("s", rnd(3, 2, 2, seed=1)), c_("b", rnd(3, 2, 2, seed=2))],
            attrs={"axis": 1, "epsilon": 1e-3},
        ),
    ],
    "GlobalAveragePool": [
        Case("rank4", [x_(rnd(2, 3, 4, 5))], dtype=F32),
        Case("rank3", [x_(rnd(2, 3, 6))], dtype=F32),
    ],
    "GlobalMaxPool": [Case("rank4", [x_(distinct(2, 3, 4, 5))], dtype=F32)],
    "AveragePool": [
        Case(
            "k3s2p1_exclude_pad",
            [x_(rnd(2, 2, 7, 7))],
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
            dtype=F32,
        ),
        Case(
            "k3s2p1_include_pad",
            [x_(rnd(2, 2, 7, 7))],
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "count_include_pad": 1},
            dtype=F32,
        ),
        Case(
            "ceil_mode",
            [x_(rnd(1, 2, 6, 6))],
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
            dtype=F32,
        ),
        Case(
            "ceil_mode_include_pad",
            [x_(rnd(1, 2, 6, 6))],
            attrs={
                "kernel_shape": [3, 3],
                "strides": [2, 2],
                "pads": [1, 1, 1, 1],
                "ceil_mode": 1,
                "count_include_pad": 1,
            },
            dtype=F32,
        ),
        Case("same_upper", [x_(rnd(1, 2, 5, 5))], attrs={"kernel_shape": [2, 2], "auto_pad": "SAME_UPPER"}, dtype=F32),
        Case("pool1d", [x_(rnd(2, 3, 9))], attrs={"kernel_shape": [3], "strides": [2]}, dtype=F32),
        Case(
            "symbolic_batch",
            [x_(rnd(2, 2, 7, 7))],
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
            dtype=F32,
            symbolic=(0,),
        ),
    ],
    "MaxPool": [
        Case(
            "k3s2p1_overlap",
            [x_(distinct(2, 2, 7, 7))],
            attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
        ),
        Case("k2s2_opset13", [x_(distinct(2, 2, 6, 6))], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=13),
        Case(
            "ceil_mode", [x_(distinct(1, 2, 7, 7))], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1}
        ),
        Case("dilated", [x_(distinct(1, 2, 7, 7))], attrs={"kernel_shape": [2, 2], "dilations": [2, 2]}),
        Case("pool1d", [x_(distinct(2, 3, 9))], attrs={"kernel_shape": [3], "strides": [2]}),
    ],
    "ReduceMean": [
        Case("axes_attr_keepdims", [x_(rnd(2, 3, 4))], attrs={"axes": [1, -1]}),
        Case("axes_attr_dropdims", [x_(rnd(2, 3, 4))], attrs={"axes": [2], "keepdims": 0}),
        Case("axes_input_opset18", [x_(rnd(2, 3, 4)), c_("axes", i64(-2))], attrs={"keepdims": 0}, opset=18),
        Case("all_axes", [x_(rnd(2, 3))], attrs={"keepdims": 0}),
    ],
    "ReduceSum": [
        Case("axes_input", [x_(rnd(2, 3, 4)), c_("axes", i64(0, 2))], attrs={"keepdims": 0}, opset=13),
        Case("keepdims", [x_(rnd(2, 3, 4)), c_("axes", i64(-1))], opset=13),
        Case("all_axes", [x_(rnd(2, 3)), NONE], opset=13),
    ],
    "Flatten": [Case("axis1", [x_(rnd(2, 3, 2, 2))]), Case("axis2", [x_(rnd(2, 3, 2, 2))], attrs={"axis": 2})],
    "Reshape": [Case("to_2d", [x_(rnd(2, 3, 4)), c_("shape", i64(0, -1))])],
    "Squeeze": [Case("axes", [x_(rnd(2, 1, 3, 1)), c_("axes", i64(1, -1))])],
    "Unsqueeze": [Case("axes", [x_(rnd(2, 3)), c_("axes", i64(0, -1))])],
    "Transpose": [
        Case("perm", [x_(rnd(2, 3, 4))], attrs={"perm": [2, 0, 1]}),
        Case("default_perm", [x_(rnd(2, 3, 4))]),
    ],
    "Concat": [
        Case(
            "axis1",
            [x_(rnd(2, 3, 2)), x_(rnd(2, 1, 2, seed=1), "b"), c_("c", rnd(2, 2, 2, seed=2))],
            attrs={"axis": 1},
            wrt=("x", "b"),
        ),
        Case("negative_axis", [x_(rnd(2, 3)), x_(rnd(2, 2, seed=1), "b")], attrs={"axis": -1}, wrt=("x", "b")),
    ],
    "Split": [
        Case("sizes_input", [x_(rnd(2, 5, 3)), c_("split", i64(2, 3))], attrs={"axis": 1}, outputs=2),
        Case("num_outputs_opset18", [x_(rnd(4, 3))], attrs={"axis": 0, "num_outputs": 2}, outputs=2, opset=18),
    ],
    "Slice": [
        Case("unit_steps", [x_(rnd(3, 5, 4)), c_("starts", i64(1, 0)), c_("ends", i64(3, -1)), c_("axes", i64(0, 2))]),
        Case(
            "step2_negative_axis",
            [x_(rnd(2, 7)), c_("starts", i64(1)), c_("ends", i64(7)), c_("axes", i64(-1)), c_("steps", i64(2))],
        ),
        Case(
            "negative_step",
            [x_(rnd(2, 5)), c_("starts", i64(-1)), c_("ends", i64(-6)), c_("axes", i64(1)), c_("steps", i64(-2))],
        ),
        # LeViT's attention downsampling: a strided slice of a grid axis, the batch of run-time size
        Case(
            "step2_symbolic_batch",
            [x_(rnd(2, 7, 7, 3)), c_("starts", i64(0)), c_("ends", i64(7)), c_("axes", i64(1)), c_("steps", i64(2))],
            symbolic=(0,),
        ),
        # bounds or sizes known only at run time (xcit's x[:, 1:] on a token axis of run-time size,
        # pit's x[:, :n] with n computed): Pad with pads computed as the spec normalises the bounds
        Case(
            "unit_step_symbolic_axis",
            [x_(rnd(2, 5, 3)), c_("starts", i64(1)), c_("ends", i64(2**63 - 1)), c_("axes", i64(1))],
            symbolic=(0, 1),
        ),
        Case("runtime_bounds", [x_(rnd(3, 6)), x_(i64(-4), "starts"), x_(i64(5), "ends"), c_("axes", i64(1))]),
        Case("runtime_bounds_clamped_no_axes", [x_(rnd(3, 4)), x_(i64(-9, 1), "starts"), x_(i64(2, 100), "ends")]),
        Case(
            "runtime_bounds_int32_empty",
            [x_(rnd(3, 4)), x_(np.array([3], np.int32), "starts"), x_(np.array([1], np.int32), "ends")],
        ),
    ],
    "Gather": [
        Case("scalar_index", [x_(rnd(2, 3, 4)), c_("i", np.array(-1, np.int64))], attrs={"axis": 1}),
        Case("repeated_indices", [x_(rnd(2, 4)), c_("i", i64(0, 3, 3, -4))], attrs={"axis": 1}),
        Case("index_matrix", [x_(rnd(5, 2)), c_("i", np.array([[0, 1], [4, 4]], np.int64))], attrs={"axis": 0}),
        # the gathered axis of run-time size (coat_lite's class token): a one-hot built at run time
        Case(
            "class_token_dynamic",
            [x_(rnd(2, 5, 3)), c_("i", np.array(0, np.int64))],
            attrs={"axis": 1},
            symbolic=(0, 1),
        ),
        Case(
            "negative_repeated_dynamic",
            [x_(rnd(2, 4, 3).astype(F32)), c_("i", i64(-1, 2, 2, -4))],
            attrs={"axis": 1},
            dtype=F32,
            symbolic=(1,),
        ),
        Case(
            "index_matrix_dynamic_last_axis",
            [x_(rnd(2, 5)), c_("i", np.array([[0, -1], [3, 3]], np.int64))],
            attrs={"axis": -1},
            symbolic=(0, 1),
        ),
    ],
    "Pad": [
        Case("constant", [x_(rnd(2, 3, 4)), c_("pads", i64(0, 1, 2, 0, 0, 1))], dtype=F32),
        Case("negative_crop", [x_(rnd(2, 5)), c_("pads", i64(0, -1, 1, 2))], dtype=F32),
        Case("axes_opset18", [x_(rnd(2, 3, 4)), c_("pads", i64(1, 2)), NONE, c_("axes", i64(-1))], opset=18, dtype=F32),
    ],
    "Resize": [
        Case(
            "linear_half_pixel_x2",
            [x_(rnd(1, 2, 3, 4)), NONE, c_("scales", np.array([1, 1, 2, 2], F32))],
            attrs={"mode": "linear"},
            dtype=F32,
        ),
        Case(
            "linear_align_corners_sizes",
            [x_(rnd(1, 1, 3, 4)), NONE, NONE, c_("sizes", i64(1, 1, 5, 7))],
            attrs={"mode": "linear", "coordinate_transformation_mode": "align_corners"},
            dtype=F32,
        ),
        Case(
            "linear_pytorch_half_pixel_down",
            [x_(rnd(1, 1, 6, 6)), NONE, c_("scales", np.array([1, 1, 0.5, 0.5], F32))],
            attrs={"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
            dtype=F32,
        ),
        Case(
            "nearest_asymmetric_floor",
            [x_(rnd(1, 2, 3, 3)), NONE, c_("scales", np.array([1, 1, 2, 3], F32))],
            attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
            dtype=F32,
        ),
        Case(
            "nearest_integer_scales_dynamic",
            [x_(rnd(2, 2, 3, 4)), NONE, c_("scales", np.array([1, 1, 2, 3], F32))],
            attrs={"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"},
            dtype=F32,
            symbolic=(0, 2, 3),
        ),
        Case(
            "nearest_half_pixel_ceil",
            [x_(rnd(1, 1, 4, 4)), NONE, NONE, c_("sizes", i64(1, 1, 7, 5))],
            attrs={"mode": "nearest", "nearest_mode": "round_prefer_ceil"},
            dtype=F32,
        ),
    ],
}


# -- int8: quantizers and quantized ops ----------------------------------------------------
# onnxruntime's output is integer, a staircase that finite differences cannot see through; so
# each case has a `surrogate`: the op in float64 with its output requantization replaced by the
# clipped straight-through form, y = z = f(DQ(inputs)) / s_y + zp_y where the integer output that
# onnxruntime computed lies strictly inside [qmin, qmax], else that output (a constant). The
# harness checks that round(z) is onnxruntime's output (within 1 where onnxruntime rounds in
# integer arithmetic), then differentiates the surrogate by central differences.

U8, I8, I32 = np.uint8, np.int8, np.int32
QRANGE = {np.dtype(U8): (0, 255), np.dtype(I8): (-128, 127)}


def ints(*shape: int, dtype: Any = U8, seed: int = 0, lo: int = 0, hi: int = 255) -> np.ndarray:
    return np.random.RandomState(seed + 11 * len(shape) + sum(shape)).randint(lo, hi + 1, size=shape).astype(dtype)


def ste(z: np.ndarray, base: np.ndarray) -> np.ndarray:
    """z where the base integer output is strictly inside its range, else that output."""
    lo, hi = QRANGE[np.dtype(base.dtype)]
    inside = (base > lo) & (base < hi)
    return np.where(inside, z, base.astype(np.float64))


def along(v: np.ndarray, rank: int, axis: int) -> np.ndarray:
    v = np.asarray(v, np.float64)
    if v.ndim == 0 or rank <= 1:
        return v
    return v.reshape([1] * axis + [v.size] + [1] * (rank - axis - 1))


def dq(x: np.ndarray, s: Any, zp: Any, axis: int = 1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return (x - along(zp, x.ndim, axis)) * along(s, x.ndim, axis)


def conv2d(
    x: np.ndarray, w: np.ndarray, strides: tuple[int, int] = (1, 1), pads: tuple[int, ...] = (0, 0, 0, 0)
) -> np.ndarray:
    """Plain NCHW convolution (group 1) in float64, for the surrogates."""
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    kh, kw = w.shape[2:]
    oh, ow = (xp.shape[2] - kh) // strides[0] + 1, (xp.shape[3] - kw) // strides[1] + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * strides[0] : i * strides[0] + kh, j * strides[1] : j * strides[1] + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", win, w)
    return out


def requantize(f: np.ndarray, s: Any, zp: Any, base: np.ndarray) -> np.ndarray:
    return ste(f / float(s) + float(zp), base)


def _scale_for(f: np.ndarray, dtype: Any = U8, spare: float = 0.9) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero point) covering `spare` of f's range: the extremes saturate, as in deployment."""
    lo, hi = QRANGE[np.dtype(dtype)]
    s = (float(f.max()) - float(f.min())) * spare / (hi - lo)
    zp = int(np.clip(round(lo - float(f.min()) * spare / s), lo, hi))
    return np.array(s, F32), np.array(zp, dtype)


def _qcase(
    id: str,
    inputs: list[tuple[str, Any, bool]],
    surrogate: Any,
    wrt: tuple[str, ...] = ("x",),
    attrs: dict[str, Any] | None = None,
    outputs: int = 1,
    opset: int = 17,
    exact: bool = True,
) -> Case:
    return Case(id, inputs, attrs or {}, wrt, opset, outputs, F32, surrogate=surrogate, exact=exact)


# fixed operands of the cases below, and output scales that saturate a few values
_XQ = ints(1, 2, 5, 5, seed=3)
_XS, _XZ = np.array(0.02, F32), np.array(128, U8)
_WQ = ints(3, 2, 3, 3, dtype=I8, seed=4, lo=-63, hi=63)  # 7 bits: no u8s8 saturation in the CPU kernels
_WS = np.array([0.01, 0.02, 0.015], F32)
_B32 = np.array([100, -50, 0], I32)
_CONV_F = conv2d(dq(_XQ, _XS, _XZ), dq(_WQ, _WS, 0, axis=0), pads=(1, 1, 1, 1)) + along(_B32 * _XS * _WS, 4, 1)
_CONV_S, _CONV_Z = _scale_for(_CONV_F)
_AQ, _BQ = ints(2, 4, seed=5), ints(4, 3, dtype=I8, seed=6, lo=-63, hi=63)
_AS, _AZ, _BS, _BZ = np.array(0.03, F32), np.array(120, U8), np.array(0.02, F32), np.array(0, I8)
_MM_F = dq(_AQ, _AS, _AZ) @ dq(_BQ, _BS, _BZ)
_MM_S, _MM_Z = _scale_for(_MM_F)
_GEMM_C = np.array([300, -200, 50], I32)
_GEMM_F = dq(_AQ, _AS, _AZ) @ dq(_BQ, _BS, _BZ) + _GEMM_C * float(_AS * _BS)
_GEMM_S, _GEMM_Z = _scale_for(_GEMM_F)
_EA, _EB = ints(2, 3, 4, seed=7), ints(3, 1, seed=8)
_ES, _EZ, _FS, _FZ = np.array(0.05, F32), np.array(100, U8), np.array(0.04, F32), np.array(140, U8)
_ADD_S, _ADD_Z = _scale_for(dq(_EA, _ES, _EZ) + dq(_EB, _FS, _FZ))
_MUL_S, _MUL_Z = _scale_for(dq(_EA, _ES, _EZ) * dq(_EB, _FS, _FZ))
_PX = ints(2, 3, 4, 4, seed=9)
_GAP_S, _GAP_Z = _scale_for(dq(_PX, _XS, _XZ).mean(axis=(2, 3)), spare=0.8)
_AVG_F = dq(_PX, _XS, _XZ).reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
_AVG_S, _AVG_Z = _scale_for(_AVG_F)
_UX = ints(2, 6, seed=10)
_SIG_S, _SIG_Z = _scale_for(1 / (1 + np.exp(-dq(_UX, np.array(0.04, F32), _XZ))))
_LRELU_F = dq(_UX, np.array(0.04, F32), _XZ)
_LRELU_S, _LRELU_Z = _scale_for(np.where(_LRELU_F > 0, _LRELU_F, 0.1 * _LRELU_F))
_DQL_X = rnd(2, 3, 4, lo=-1.0, hi=3.0).astype(F32)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


INT8_CASES: dict[str, list[Case]] = {
    "QuantizeLinear": [
        _qcase(
            "per_tensor_uint8_saturating",
            [x_(rnd(2, 3, 4, lo=-1.0, hi=6.0).astype(F32)), c_("s", np.array(0.02, F32)), c_("zp", np.array(10, U8))],
            lambda v, base: [ste(v["x"] / v["s"] + v["zp"], base[0])],
        ),
        _qcase(
            "per_axis_int8",
            [
                x_(rnd(2, 3, 4, lo=-2.0, hi=2.0).astype(F32)),
                c_("s", np.array([0.01, 0.02, 0.005], F32)),
                c_("zp", np.array([0, 5, -3], I8)),
            ],
            lambda v, base: [ste(v["x"] / along(v["s"], 3, 1) + along(v["zp"], 3, 1), base[0])],
            attrs={"axis": 1},
        ),
    ],
    "DequantizeLinear": [
        _qcase(
            "per_tensor_uint8",
            [x_(ints(2, 3, 4)), c_("s", np.array(0.02, F32)), c_("zp", np.array(128, U8))],
            lambda v, base: [dq(v["x"], v["s"], v["zp"])],
        ),
        _qcase(
            "per_axis_int8",
            [
                x_(ints(2, 3, 4, dtype=I8, lo=-128, hi=127)),
                c_("s", np.array([0.01, 0.02, 0.005], F32)),
                c_("zp", np.array([0, 5, -3], I8)),
            ],
            lambda v, base: [dq(v["x"], v["s"], v["zp"], 1)],
            attrs={"axis": 1},
        ),
    ],
    "DynamicQuantizeLinear": [
        _qcase(
            "uint8",
            [x_(_DQL_X)],
            # scale and zero point are those of the base point (straight-through: not differentiated)
            lambda v, base: [ste(v["x"] / float(base[1]) + float(base[2]), base[0]), base[1] * 1.0, base[2] * 1.0],
            outputs=3,
        ),
    ],
    "ConvInteger": [
        _qcase(
            "pads_zero_points",
            [x_(_XQ), c_("w", _WQ), c_("xz", _XZ), c_("wz", np.array(3, I8))],
            lambda v, base: [conv2d(v["x"] - v["xz"], v["w"] - v["wz"], pads=(1, 1, 1, 1))],
            attrs={"pads": [1, 1, 1, 1]},
        ),
    ],
    "MatMulInteger": [
        _qcase(
            "constant_b",
            [x_(_AQ), c_("b", _BQ), c_("az", _AZ), c_("bz", np.array(2, I8))],
            lambda v, base: [(v["x"] - v["az"]) @ (v["b"] - v["bz"])],
        ),
    ],
    "QLinearConv": [
        _qcase(
            "per_channel_bias_pads",
            [
                x_(_XQ),
                c_("xs", _XS),
                c_("xz", _XZ),
                c_("w", _WQ),
                c_("ws", _WS),
                c_("wz", np.zeros(3, I8)),
                c_("ys", _CONV_S),
                c_("yz", _CONV_Z),
                c_("b", _B32),
            ],
            lambda v, base: [
                requantize(
                    conv2d(dq(v["x"], v["xs"], v["xz"]), dq(v["w"], v["ws"], 0, axis=0), pads=(1, 1, 1, 1))
                    + along(v["b"] * v["xs"] * v["ws"], 4, 1),
                    v["ys"],
                    v["yz"],
                    base[0],
                )
            ],
            attrs={"pads": [1, 1, 1, 1]},
        ),
    ],
    "QLinearMatMul": [
        _qcase(
            "constant_b",
            [
                x_(_AQ),
                c_("as", _AS),
                c_("az", _AZ),
                c_("b", _BQ),
                c_("bs", _BS),
                c_("bz", _BZ),
                c_("ys", _MM_S),
                c_("yz", _MM_Z),
            ],
            lambda v, base: [
                requantize(dq(v["x"], v["as"], v["az"]) @ dq(v["b"], v["bs"], v["bz"]), v["ys"], v["yz"], base[0])
            ],
        ),
    ],
    "com.microsoft.QGemm": [
        _qcase(
            "transB_bias",
            [
                x_(_AQ),
                c_("as", _AS),
                c_("az", _AZ),
                c_("b", np.ascontiguousarray(_BQ.T)),
                c_("bs", _BS),
                c_("bz", _BZ),
                c_("c", _GEMM_C),
                c_("ys", _GEMM_S),
                c_("yz", _GEMM_Z),
            ],
            lambda v, base: [
                requantize(
                    dq(v["x"], v["as"], v["az"]) @ dq(v["b"], v["bs"], v["bz"]).T + v["c"] * v["as"] * v["bs"],
                    v["ys"],
                    v["yz"],
                    base[0],
                )
            ],
            attrs={"transB": 1},
            exact=False,
        ),
    ],
    "com.microsoft.QLinearAdd": [
        _qcase(
            "broadcast",
            [
                x_(_EA),
                c_("as", _ES),
                c_("az", _EZ),
                x_(_EB, "b"),
                c_("bs", _FS),
                c_("bz", _FZ),
                c_("ys", _ADD_S),
                c_("yz", _ADD_Z),
            ],
            lambda v, base: [
                requantize(dq(v["x"], v["as"], v["az"]) + dq(v["b"], v["bs"], v["bz"]), v["ys"], v["yz"], base[0])
            ],
            wrt=("x", "b"),
            exact=False,
        ),
    ],
    "com.microsoft.QLinearMul": [
        _qcase(
            "broadcast",
            [
                x_(_EA),
                c_("as", _ES),
                c_("az", _EZ),
                x_(_EB, "b"),
                c_("bs", _FS),
                c_("bz", _FZ),
                c_("ys", _MUL_S),
                c_("yz", _MUL_Z),
            ],
            lambda v, base: [
                requantize(dq(v["x"], v["as"], v["az"]) * dq(v["b"], v["bs"], v["bz"]), v["ys"], v["yz"], base[0])
            ],
            wrt=("x", "b"),
            exact=False,
        ),
    ],
    "com.microsoft.QLinearGlobalAveragePool": [
        _qcase(
            "rank4",
            [x_(_PX), c_("xs", _XS), c_("xz", _XZ), c_("ys", _GAP_S), c_("yz", _GAP_Z)],
            lambda v, base: [
                requantize(dq(v["x"], v["xs"], v["xz"]).mean(axis=(2, 3), keepdims=True), v["ys"], v["yz"], base[0])
            ],
            attrs={"channels_last": 0},
            exact=False,
        ),
    ],
    "com.microsoft.QLinearAveragePool": [
        _qcase(
            "k2s2",
            [x_(_PX), c_("xs", _XS), c_("xz", _XZ), c_("ys", _AVG_S), c_("yz", _AVG_Z)],
            lambda v, base: [
                requantize(
                    dq(v["x"], v["xs"], v["xz"]).reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5)), v["ys"], v["yz"], base[0]
                )
            ],
            attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
            exact=False,
        ),
    ],
    "com.microsoft.QLinearConcat": [
        _qcase(
            "axis1",
            [
                c_("ys", np.array(0.05, F32)),
                c_("yz", np.array(128, U8)),
                x_(_EA[:, :2]),
                c_("as", _ES),
                c_("az", _EZ),
                x_(_EA[:, 2:], "b"),
                c_("bs", _FS),
                c_("bz", _FZ),
            ],
            lambda v, base: [
                requantize(
                    np.concatenate([dq(v["x"], v["as"], v["az"]), dq(v["b"], v["bs"], v["bz"])], axis=1),
                    v["ys"],
                    v["yz"],
                    base[0],
                )
            ],
            wrt=("x", "b"),
            attrs={"axis": 1},
            exact=False,
        ),
    ],
    "com.microsoft.QLinearSigmoid": [
        _qcase(
            "plain",
            [x_(_UX), c_("xs", np.array(0.04, F32)), c_("xz", _XZ), c_("ys", _SIG_S), c_("yz", _SIG_Z)],
            lambda v, base: [requantize(1 / (1 + np.exp(-dq(v["x"], v["xs"], v["xz"]))), v["ys"], v["yz"], base[0])],
            exact=False,
        ),
    ],
    "com.microsoft.QLinearLeakyRelu": [
        _qcase(
            "alpha",
            [x_(_UX), c_("xs", np.array(0.04, F32)), c_("xz", _XZ), c_("ys", _LRELU_S), c_("yz", _LRELU_Z)],
            lambda v, base: [
                requantize(
                    (lambda f: np.where(f > 0, f, 0.1 * f))(dq(v["x"], v["xs"], v["xz"])), v["ys"], v["yz"], base[0]
                )
            ],
            attrs={"alpha": 0.1},
            exact=False,
        ),
    ],
    "com.microsoft.QLinearSoftmax": [
        _qcase(
            "last_axis",
            [
                x_(_UX),
                c_("xs", np.array(0.04, F32)),
                c_("xz", _XZ),
                c_("ys", np.array(1 / 256, F32)),
                c_("yz", np.array(0, U8)),
            ],
            lambda v, base: [requantize(_softmax(dq(v["x"], v["xs"], v["xz"])), v["ys"], v["yz"], base[0])],
            attrs={"axis": -1, "opset": 13},
            exact=False,
        ),
    ],
}
CASES.update(INT8_CASES)


# -- issue 12, rules-a: Max/Min/Abs/Where, Expand/Tile, activations, ReduceMax/Min/L2/LogSumExp,
# GatherElements, Einsum ------------------------------------------------------------------------


def _row_extremum_tied(x: np.ndarray, largest: bool) -> np.ndarray:
    """Each row's extremum (last axis) copied onto the row's opposite extremum: a two-way tie per row,
    where a central difference is 1/2 for each of the two (one side moves the extremum, the other
    does not), the rules' equal share."""
    x = x.copy()
    for row in np.ndindex(x.shape[:-1]):
        v = x[row]
        v[np.argmin(v) if largest else np.argmax(v)] = v.max() if largest else v.min()
    return x


def _thresholded(alpha: float, *shape: int) -> np.ndarray:
    return alpha + rnd(*shape, away=0.05) * 2  # kept away from the kink at alpha


_MAX_X = rnd(2, 4)
_MAX_TIES = rnd(2, 4, seed=1)
_MAX_TIES[0, 1], _MAX_TIES[1, 2] = _MAX_X[0, 1], _MAX_X[1, 2]
_GE_INDEX = np.array([[0, 3, 3, -1, 1], [2, 2, -4, 0, 0], [1, 1, 1, 3, -2]], np.int64)

RULES_A_CASES: dict[str, list[Case]] = {
    "Max": [
        Case("two_broadcast", [x_(rnd(2, 3, 4)), x_(rnd(3, 1, seed=1), "b")], wrt=("x", "b")),
        Case(
            "three_opset11",
            [x_(rnd(2, 3)), x_(rnd(3, seed=1), "b"), x_(rnd(2, 1, seed=2), "c")],
            wrt=("x", "b", "c"),
            opset=11,
        ),
        Case("single_opset13", [x_(rnd(2, 3))], opset=13),
        # two-way ties at two positions: each operand gets half of dY there
        Case("two_way_ties", [x_(_MAX_X), x_(_MAX_TIES, "b")], wrt=("x", "b")),
    ],
    "Min": [
        Case(
            "three_broadcast_opset13",
            [x_(rnd(2, 3, 4)), x_(rnd(4, seed=1), "b"), x_(rnd(2, 1, 1, seed=2), "c")],
            wrt=("x", "b", "c"),
            opset=13,
        ),
        Case("two_opset11", [x_(rnd(3, 2)), x_(rnd(3, 2, seed=1), "b")], wrt=("x", "b"), opset=11),
    ],
    "Abs": [Case("plain", [x_(rnd(2, 3, 4, away=0.05))]), Case("opset11", [x_(rnd(3, 2, away=0.05))], opset=11)],
    "Where": [
        Case(
            "broadcast_const_condition",
            [c_("c", rnd(2, 1, 4, seed=3) > 0), x_(rnd(3, 4)), x_(rnd(2, 3, 1, seed=1), "b")],
            wrt=("x", "b"),
        ),
        Case(
            "runtime_condition_opset11",
            [x_(rnd(2, 3, seed=3) > 0, "c"), x_(rnd(2, 3)), x_(rnd(3, seed=1), "b")],
            wrt=("x", "b"),
            opset=11,
        ),
        Case("scalar_other_opset16", [x_(rnd(2, 3, seed=3) > 0, "c"), x_(rnd(2, 3)), c_("b", np.array(0.0))], opset=16),
    ],
    "Expand": [
        Case("channels_to_grid", [x_(rnd(2, 3, 1, 1)), c_("shape", i64(2, 3, 4, 5))]),
        Case("rank_up_opset11", [x_(rnd(3, 1)), c_("shape", i64(2, 1, 4))], opset=11),
        Case("shape_of_ones", [x_(rnd(2, 3, 4)), c_("shape", i64(1, 1))], opset=13),
        # a run-time shape: the broadcast axes are found at run time
        Case("runtime_shape", [x_(rnd(3, 1)), x_(i64(2, 3, 4), "shape")]),
        Case("symbolic_batch", [x_(rnd(2, 1, 3)), c_("shape", i64(1, 4, 1))], symbolic=(0,)),
        Case("opset21", [x_(rnd(3, 1)), c_("shape", i64(3, 2))], opset=21),
    ],
    "Tile": [
        Case("const_repeats", [x_(rnd(2, 3)), c_("r", i64(2, 3))]),
        Case("rank3_opset11", [x_(rnd(2, 1, 3)), c_("r", i64(1, 4, 2))], opset=11),
        Case("runtime_repeats", [x_(rnd(2, 3)), x_(i64(3, 1), "r")], opset=13),
        Case("symbolic_batch", [x_(rnd(2, 3, 2)), c_("r", i64(2, 1, 2))], symbolic=(0,)),
    ],
    "Softplus": [
        Case("plain", [x_(rnd(2, 3, 4, lo=-4, hi=4))], dtype=F32),
        Case("opset11", [x_(rnd(3, 4, lo=-4, hi=4))], opset=11, dtype=F32),
    ],
    "Mish": [Case("opset18", [x_(rnd(2, 3, 4, lo=-4, hi=4))], opset=18)],
    "Elu": [
        Case("default", [x_(rnd(2, 3, 4, lo=-3, hi=3, away=0.05))], dtype=F32),
        Case("alpha_opset11", [x_(rnd(3, 4, lo=-3, hi=3, away=0.05))], attrs={"alpha": 0.7}, opset=11, dtype=F32),
    ],
    "Selu": [
        Case("default", [x_(rnd(2, 3, 4, lo=-3, hi=3, away=0.05))], dtype=F32),
        Case(
            "alpha_gamma_opset11",
            [x_(rnd(3, 4, lo=-3, hi=3, away=0.05))],
            attrs={"alpha": 1.3, "gamma": 0.8},
            opset=11,
            dtype=F32,
        ),
    ],
    "Celu": [
        Case("default_opset12", [x_(rnd(2, 3, 4, lo=-3, hi=3, away=0.05))], opset=12, dtype=F32),
        Case("alpha", [x_(rnd(3, 4, lo=-3, hi=3, away=0.05))], attrs={"alpha": 0.5}, dtype=F32),
    ],
    "Softsign": [
        Case("plain", [x_(rnd(2, 3, 4, lo=-3, hi=3, away=0.05))], dtype=F32),
        Case("opset11", [x_(rnd(3, 4, lo=-3, hi=3, away=0.05))], opset=11, dtype=F32),
    ],
    "ThresholdedRelu": [
        Case("default_alpha", [x_(_thresholded(1.0, 2, 3, 4))], dtype=F32),
        Case("alpha_opset11", [x_(_thresholded(0.3, 3, 4))], attrs={"alpha": 0.3}, opset=11, dtype=F32),
    ],
    "ReduceMax": [
        Case("axes_attr_keepdims_opset13", [x_(distinct(2, 3, 4))], attrs={"axes": [1]}, opset=13),
        Case("axes_attr_dropdims_opset11", [x_(distinct(2, 3, 4))], attrs={"axes": [-1, 0], "keepdims": 0}, opset=11),
        Case("axes_input_opset18", [x_(distinct(2, 3, 4)), c_("axes", i64(0, 2))], attrs={"keepdims": 0}, opset=18),
        Case("all_axes_opset18", [x_(distinct(2, 3))], attrs={"keepdims": 0}, opset=18),
        Case("noop_empty_axes_opset18", [x_(distinct(2, 3))], attrs={"noop_with_empty_axes": 1}, opset=18),
        Case("axes_input_opset20", [x_(distinct(2, 3, 2)), c_("axes", i64(-2))], opset=20),
        Case("keepdims_opset21", [x_(distinct(2, 3, 2)), c_("axes", i64(0, 1))], opset=21),
        # a two-way tie in every row: each tied position gets half of dY (torch.amax's share)
        Case("two_way_ties", [x_(_row_extremum_tied(distinct(3, 5), True))], attrs={"axes": [1]}, opset=13),
    ],
    "ReduceMin": [
        Case("axes_attr_opset11", [x_(distinct(2, 3, 4))], attrs={"axes": [2]}, opset=11),
        Case(
            "axes_input_dropdims_opset18", [x_(distinct(2, 3, 4)), c_("axes", i64(1))], attrs={"keepdims": 0}, opset=18
        ),
        Case(
            "two_way_ties_opset18",
            [x_(_row_extremum_tied(distinct(2, 2, 4), False)), c_("axes", i64(-1))],
            attrs={"keepdims": 0},
            opset=18,
        ),
    ],
    "ReduceL2": [
        Case("axes_attr_opset13", [x_(rnd(2, 3, 4))], attrs={"axes": [1, 2]}, opset=13),
        Case("dropdims_opset11", [x_(rnd(2, 3, 4))], attrs={"axes": [0], "keepdims": 0}, opset=11),
        Case("axes_input_opset18", [x_(rnd(2, 3, 4)), c_("axes", i64(-1))], attrs={"keepdims": 0}, opset=18),
        Case("noop_empty_axes_opset18", [x_(rnd(2, 3, away=0.05))], attrs={"noop_with_empty_axes": 1}, opset=18),
    ],
    "ReduceLogSumExp": [
        Case("axes_attr_opset13", [x_(rnd(2, 3, 4, lo=-3, hi=3))], attrs={"axes": [1]}, opset=13),
        Case("all_dropdims_opset11", [x_(rnd(2, 3, lo=-3, hi=3))], attrs={"keepdims": 0}, opset=11),
        Case("axes_input_opset18", [x_(rnd(2, 3, 4)), c_("axes", i64(0, -1))], attrs={"keepdims": 0}, opset=18),
        Case("noop_empty_axes_opset18", [x_(rnd(2, 3))], attrs={"noop_with_empty_axes": 1}, opset=18),
    ],
    "GatherElements": [
        # repeated and negative indices: their gradients add up
        Case("scatter_add_opset16", [x_(rnd(3, 4)), c_("i", _GE_INDEX)], attrs={"axis": 1}, opset=16),
        Case("one_hot_opset13", [x_(rnd(3, 4)), c_("i", _GE_INDEX)], attrs={"axis": -1}, opset=13),
        Case("one_hot_axis0_opset11", [x_(rnd(4, 3)), c_("i", _GE_INDEX.T.copy())], opset=11),
        # indices shorter than X on the other axis: zeros there
        Case("short_indices_opset13", [x_(rnd(4, 5)), c_("i", _GE_INDEX[:2, :3].T.copy())], opset=13),
        Case("short_indices_opset18", [x_(rnd(4, 5)), c_("i", _GE_INDEX[:2, :3].T.copy())], opset=18),
        Case("scatter_add_opset21", [x_(rnd(4, 3)), c_("i", _GE_INDEX.T.copy())], attrs={"axis": 0}, opset=21),
        Case(
            "runtime_indices_symbolic_opset13",
            [x_(rnd(2, 3, 4)), x_(np.stack([_GE_INDEX, _GE_INDEX[::-1]]), "i")],
            attrs={"axis": 2},
            opset=13,
            symbolic=(0, 1, 2),
        ),
    ],
    "Einsum": [
        Case(
            "matmul_opset12",
            [x_(rnd(2, 3)), x_(rnd(3, 4, seed=1), "w")],
            attrs={"equation": "ij,jk->ik"},
            wrt=("x", "w"),
            opset=12,
        ),
        Case(
            "implicit_output", [x_(rnd(2, 3)), x_(rnd(3, 4, seed=1), "w")], attrs={"equation": "kj,ji"}, wrt=("x", "w")
        ),
        Case(
            "attention",
            [x_(rnd(2, 2, 3, 4)), x_(rnd(2, 2, 5, 4, seed=1), "w")],
            attrs={"equation": "bhqd,bhkd->bhqk"},
            wrt=("x", "w"),
            opset=18,
        ),
        Case(
            "ellipsis_in_one_operand",
            [x_(rnd(2, 3, 4)), x_(rnd(4, 5, seed=1), "w")],
            attrs={"equation": "...ij,jk->...ik"},
            wrt=("x", "w"),
        ),
        Case(
            "ellipsis_broadcast_one",
            [x_(rnd(2, 3, 4)), x_(rnd(1, 4, 5, seed=1), "w")],
            attrs={"equation": "...ij , ...jk -> ...ik"},
            wrt=("x", "w"),
        ),
        Case(
            "three_operands",
            [x_(rnd(2, 3)), x_(rnd(3, 4, seed=1), "w"), x_(rnd(2, 4, seed=2), "c")],
            attrs={"equation": "bi,ij,bj->b"},
            wrt=("x", "w", "c"),
        ),
        Case(
            "summed_alone", [x_(rnd(2, 3, 4)), x_(rnd(3, seed=1), "w")], attrs={"equation": "ijk,j->i"}, wrt=("x", "w")
        ),
        Case("sum_all", [x_(rnd(2, 3))], attrs={"equation": "ij->"}),
        Case("diagonal", [x_(rnd(3, 3))], attrs={"equation": "ii->i"}),
        Case(
            "trace_batched", [x_(rnd(2, 3, 3)), x_(rnd(2, seed=1), "w")], attrs={"equation": "bii,b->b"}, wrt=("x", "w")
        ),
        Case("transpose_symbolic", [x_(rnd(2, 3, 4))], attrs={"equation": "abc->cab"}, symbolic=(0, 2)),
        Case("ones_symbolic", [x_(rnd(2, 3, 4))], attrs={"equation": "abc->a"}, symbolic=(0, 1, 2)),
        Case("diagonal_symbolic", [x_(rnd(2, 3, 3))], attrs={"equation": "bii->bi"}, symbolic=(0, 1, 2)),
        Case(
            "uppercase_diagonal_opset21",
            [x_(rnd(2, 3, 3)), x_(rnd(2, seed=1), "w")],
            attrs={"equation": "Aii,A->Ai"},
            wrt=("x", "w"),
            opset=21,
        ),
    ],
}
CASES.update(RULES_A_CASES)
# -- end of rules-a -----------------------------------------------------------------------------


# -- rules-b: normalisations over the sample, depth <-> space, Col2Im, TopK (issue 12) --------
# onnxruntime has no double kernel for InstanceNormalization, MeanVarianceNormalization, Col2Im
# (and the Conv its gradient uses): float32 cases there.


def _scale_bias(count: int, seed: int) -> list[tuple[str, Any, bool]]:
    return [x_(rnd(count, seed=seed, lo=0.5, hi=1.5), "s"), x_(rnd(count, seed=seed + 1), "b")]


RULES_B_CASES: dict[str, list[Case]] = {
    "InstanceNormalization": [
        Case("rank4", [x_(rnd(2, 3, 4, 5)), *_scale_bias(3, 1)], wrt=("x", "s", "b"), dtype=F32),
        Case(
            "rank3_epsilon_opset11",
            [x_(rnd(2, 4, 6)), *_scale_bias(4, 2)],
            attrs={"epsilon": 1e-2},
            wrt=("x", "s", "b"),
            opset=11,
            dtype=F32,
        ),
        Case(
            "rank5_symbolic",
            [x_(rnd(1, 2, 3, 2, 3)), c_("s", rnd(2, seed=3)), c_("b", rnd(2, seed=4))],
            symbolic=(0,),
            dtype=F32,
        ),
    ],
    "GroupNormalization": [
        # opset 18: scale and bias per group
        Case(
            "opset18_per_group",
            [x_(rnd(2, 6, 3, 3)), *_scale_bias(3, 5)],
            attrs={"num_groups": 3},
            wrt=("x", "s", "b"),
            opset=18,
        ),
        Case(
            "opset18_one_group_epsilon_rank3",
            [x_(rnd(2, 4, 5)), *_scale_bias(1, 6)],
            attrs={"num_groups": 1, "epsilon": 1e-2},
            wrt=("x", "s", "b"),
            opset=18,
        ),
        # opset 21: scale and bias per channel
        Case(
            "opset21_per_channel",
            [x_(rnd(2, 6, 3, 3)), *_scale_bias(6, 7)],
            attrs={"num_groups": 2, "stash_type": 11},
            wrt=("x", "s", "b"),
            opset=21,
        ),
        Case(
            "opset21_group_per_channel_rank5_symbolic",
            [x_(rnd(2, 4, 2, 2, 3)), c_("s", rnd(4, seed=8)), c_("b", rnd(4, seed=9))],
            attrs={"num_groups": 4, "epsilon": 1e-3, "stash_type": 11},
            opset=21,
            symbolic=(0,),
        ),
        Case(
            "opset21_stash_float32",
            [x_(rnd(2, 6, 3, 3).astype(F32)), *_scale_bias(6, 10)],
            attrs={"num_groups": 3},
            wrt=("x", "s", "b"),
            opset=21,
            dtype=F32,
        ),
    ],
    "MeanVarianceNormalization": [
        # (onnx's full check cannot expand the function without its axes: here the default,
        # [0, 2, 3], is spelled out; tests/test_op_coverage.py prepares a model that leaves it out)
        Case("axes_0_2_3", [x_(rnd(2, 3, 4, 4))], attrs={"axes": [0, 2, 3]}, opset=13, dtype=F32),
        Case("axes_spatial_opset11", [x_(rnd(2, 3, 4, 4))], attrs={"axes": [2, 3]}, opset=11, dtype=F32),
        Case("axes_negative_rank3_opset18", [x_(rnd(2, 5, 6))], attrs={"axes": [-1]}, opset=18, dtype=F32),
        Case("axes_channels", [x_(rnd(2, 6, 3))], attrs={"axes": [1]}, opset=17, dtype=F32),
    ],
    "DepthToSpace": [
        Case("dcr_default_opset9", [x_(rnd(2, 8, 2, 3))], attrs={"blocksize": 2}, opset=9),
        Case("dcr_opset11", [x_(rnd(1, 9, 2, 2))], attrs={"blocksize": 3, "mode": "DCR"}, opset=11),
        Case("crd_opset11", [x_(rnd(2, 8, 2, 3))], attrs={"blocksize": 2, "mode": "CRD"}, opset=11),
        Case(
            "crd_blocksize3_symbolic", [x_(rnd(2, 18, 2, 2))], attrs={"blocksize": 3, "mode": "CRD"}, symbolic=(0, 2, 3)
        ),
    ],
    "SpaceToDepth": [
        Case("blocksize2_opset11", [x_(rnd(2, 3, 4, 6))], attrs={"blocksize": 2}, opset=11),
        Case("blocksize3_symbolic", [x_(rnd(1, 2, 6, 3))], attrs={"blocksize": 3}, symbolic=(0, 2, 3)),
    ],
    "Col2Im": [
        Case(
            "plain",
            [x_(rnd(2, 2 * 4, 9)), c_("image_shape", i64(4, 4)), c_("block_shape", i64(2, 2))],
            opset=18,
            dtype=F32,
        ),
        Case(
            "strides_pads_dilations",
            [x_(rnd(2, 3 * 6, 9)), c_("image_shape", i64(5, 6)), c_("block_shape", i64(2, 3))],
            attrs={"strides": [2, 1], "pads": [1, 0, 0, 1], "dilations": [1, 2]},
            opset=18,
            dtype=F32,
            symbolic=(0,),
        ),
        Case(
            "one_dimensional",
            [x_(rnd(1, 2 * 3, 4)), c_("image_shape", i64(9)), c_("block_shape", i64(3))],
            attrs={"strides": [2], "pads": [0, 1]},
            opset=21,
            dtype=F32,
        ),
    ],
    "TopK": [
        Case("last_axis", [x_(distinct(2, 3, 6)), c_("k", i64(3))], outputs=2, opset=11, dtype=F32),
        Case(
            "axis1_smallest_unsorted",
            [x_(distinct(2, 5, 3)), c_("k", i64(2))],
            attrs={"axis": 1, "largest": 0, "sorted": 0},
            outputs=2,
            opset=11,
        ),
        Case("opset10", [x_(distinct(3, 5)), c_("k", i64(2))], outputs=2, opset=10, dtype=F32),
    ],
}
CASES.update(RULES_B_CASES)
# Gather with indices the model computes (TopK's, ArgMax's): a one-hot built at run time
CASES["Gather"] = CASES["Gather"] + [
    Case("run_time_indices_2d_negative", [x_(rnd(3, 4, 2)), x_(np.array([[2, 0], [2, -1]]), "idx")], attrs={"axis": 1}),
    Case("run_time_indices_1d_opset11", [x_(rnd(5, 3)), x_(np.array([4, 1, 4], np.int32), "idx")], opset=11),
    Case(
        "run_time_scalar_index_symbolic",
        [x_(rnd(2, 3, 4)), x_(np.array(-2), "idx")],
        attrs={"axis": 2},
        symbolic=(0,),
    ),
]
# -- end rules-b ---------------------------------------------------------------------------

# -- maxpool branch: MaxPool with overlapping windows below opset 16 (equality masks), LRN ---------
_MP = {"kernel_shape": [3, 3], "strides": [2, 2]}
MAXPOOL_LRN_CASES: dict[str, list[Case]] = {
    "MaxPool": [
        Case(
            "sppf_k5s1p2_opset12", [x_(distinct(1, 2, 8, 8))], {"kernel_shape": [5, 5], "pads": [2, 2, 2, 2]}, opset=12
        ),
        Case("k3s2p1_opset11", [x_(distinct(2, 2, 7, 7))], {**_MP, "pads": [1, 1, 1, 1]}, opset=11, symbolic=(0,)),
        Case("alexnet_k3s2_opset13", [x_(distinct(1, 2, 9, 9))], _MP, opset=13),
        Case("k3s2_opset15", [x_(distinct(1, 2, 8, 8))], _MP, opset=15),
        Case(
            "dilated_k3d2_opset13", [x_(distinct(1, 2, 8, 8))], {"kernel_shape": [3, 3], "dilations": [2, 2]}, opset=13
        ),
        Case(
            "dilated_strided_padded_opset13",
            [x_(distinct(1, 2, 9, 8))],
            {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [2, 2], "pads": [2, 1, 1, 0]},
            opset=13,
        ),
        Case("ceil_mode_opset12", [x_(distinct(1, 2, 8, 8))], {**_MP, "ceil_mode": 1}, opset=12),
        Case(
            "ceil_mode_padded_opset12",
            [x_(distinct(1, 2, 8, 9))],
            {**_MP, "pads": [1, 0, 1, 1], "ceil_mode": 1},
            opset=12,
        ),
        Case("same_upper_opset12", [x_(distinct(1, 2, 8, 8))], {**_MP, "auto_pad": "SAME_UPPER"}, opset=12),
        Case("same_lower_opset12", [x_(distinct(1, 2, 8, 8))], {**_MP, "auto_pad": "SAME_LOWER"}, opset=12),
        Case("valid_k3s1_opset12", [x_(distinct(1, 2, 6, 7))], {"kernel_shape": [3, 3], "auto_pad": "VALID"}, opset=12),
        Case("asymmetric_pads_opset13", [x_(distinct(1, 2, 7, 7))], {**_MP, "pads": [0, 1, 2, 1]}, opset=13),
        Case("anisotropic_opset13", [x_(distinct(1, 2, 7, 8))], {"kernel_shape": [3, 2], "strides": [1, 2]}, opset=13),
        Case("pool1d_k3s1p1_opset11", [x_(distinct(2, 3, 9))], {"kernel_shape": [3], "pads": [1, 1]}, opset=11),
        Case(
            "pool3d_k3s2p1_opset13",
            [x_(distinct(1, 2, 5, 5, 5))],
            {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2], "pads": [1] * 6},
            opset=13,
        ),
        # float32: the placement is a ConvTranspose (float64: Pads, above)
        Case(
            "sppf_k5s1p2_f32",
            [x_(distinct(1, 2, 8, 8))],
            {"kernel_shape": [5, 5], "pads": [2] * 4},
            opset=12,
            dtype=F32,
        ),
        Case(
            "dilated_strided_padded_ceil_f32",
            [x_(distinct(1, 2, 9, 8))],
            {"kernel_shape": [3, 2], "strides": [2, 1], "dilations": [2, 2], "pads": [2, 1, 1, 0], "ceil_mode": 1},
            opset=13,
            dtype=F32,
        ),
        Case("same_lower_f32", [x_(distinct(1, 2, 8, 8))], {**_MP, "auto_pad": "SAME_LOWER"}, opset=13, dtype=F32),
        Case("pool1d_f32", [x_(distinct(2, 3, 9))], {"kernel_shape": [3], "pads": [1, 1]}, opset=11, dtype=F32),
        Case(
            "pool3d_f32",
            [x_(distinct(1, 2, 5, 5, 5))],
            {"kernel_shape": [3] * 3, "strides": [2] * 3},
            opset=13,
            dtype=F32,
        ),
    ],
    # even sizes: onnxruntime refuses them (size % 2 == 1); tests/test_pool_norm.py checks one in float64 with
    # onnx.reference
    "LRN": [
        Case(
            "size3", [x_(rnd(2, 5, 3, 3, lo=-2, hi=2))], {"size": 3, "alpha": 0.5, "beta": 0.75, "bias": 2.0}, dtype=F32
        ),
        Case("alexnet_size5_defaults", [x_(rnd(2, 7, 3, 3, lo=-30, hi=30))], {"size": 5}, opset=11, dtype=F32),
        Case(
            "size1_beta1",
            [x_(rnd(1, 3, 2, 2, lo=-2, hi=2))],
            {"size": 1, "alpha": 0.3, "beta": 1.0, "bias": 0.5},
            dtype=F32,
        ),
        Case(
            "size7_wider_than_channels",
            [x_(rnd(1, 4, 2, 3, lo=-2, hi=2))],
            {"size": 7, "alpha": 1.0, "beta": 0.5, "bias": 1.0},
            opset=13,
            dtype=F32,
        ),
    ],
}
CASES.update({op: CASES.get(op, []) + cases for op, cases in MAXPOOL_LRN_CASES.items()})

# -- recurrent ops (LSTM, GRU, RNN): onnxruntime runs them in float32 only -------------------------
# T = 4 steps, N = 2, I = 3, H = 3; gradients to X and the initial states, every output seeded.
_T, _N, _I, _H = 4, 2, 3, 3


def _rnn_inputs(gates: int, dirs: int, layout: int = 0, lens: Any = None, cell: bool = False, seed: int = 0):  # type: ignore[no-untyped-def]
    xs = (_N, _T, _I) if layout else (_T, _N, _I)
    hs = (_N, dirs, _H) if layout else (dirs, _N, _H)
    w = rnd(dirs, gates * _H, _I, seed=seed + 1) * 0.8
    r = rnd(dirs, gates * _H, _H, seed=seed + 2) * 0.8
    bias = rnd(dirs, 2 * gates * _H, seed=seed + 3) * 0.5
    inputs = [x_(rnd(*xs, seed=seed)), c_("w", w), c_("r", r), c_("b", bias)]
    inputs.append(NONE if lens is None else c_("lens", np.array(lens, np.int32)))
    inputs.append(x_(rnd(*hs, seed=seed + 4) * 0.5, "h0"))
    if cell:
        inputs.append(x_(rnd(*hs, seed=seed + 5) * 0.5, "c0"))
    return inputs


def _lstm_case(
    id: str,
    dirs: int = 1,
    layout: int = 0,
    lens: Any = None,
    peepholes: bool = False,
    dynamic: bool = False,
    **attrs: Any,
) -> Case:
    inputs = _rnn_inputs(4, dirs, layout, lens, cell=True)
    if peepholes:
        inputs.append(c_("p", rnd(dirs, 3 * _H, seed=9) * 0.5))
    return Case(
        id,
        inputs,
        attrs={"hidden_size": _H, "layout": layout, **attrs},
        wrt=("x", "h0", "c0"),
        opset=14,
        outputs=3,
        dtype=F32,
        symbolic=(0,) if dynamic else (),  # the sequence length at run time: the Loop path
    )


def _gru_case(
    op: str, id: str, dirs: int = 1, layout: int = 0, lens: Any = None, dynamic: bool = False, **attrs: Any
) -> Case:
    inputs = _rnn_inputs(3 if op == "GRU" else 1, dirs, layout, lens, seed=20)
    return Case(
        id,
        inputs,
        attrs={"hidden_size": _H, "layout": layout, **attrs},
        wrt=("x", "h0"),
        opset=14,
        outputs=2,
        dtype=F32,
        symbolic=(0,) if dynamic else (),
    )


def _replace_opset(case: Case, opset: int) -> Case:
    case.opset = opset
    if opset < 14:  # layout came with opset 14
        case.attrs.pop("layout")
    return case


RECURRENT_CASES: dict[str, list[Case]] = {
    "LSTM": [
        _lstm_case("forward"),
        _lstm_case("reverse_lens", lens=[4, 2], direction="reverse"),
        _lstm_case(
            "bidirectional_peepholes_clip_lens",
            dirs=2,
            lens=[3, 4],
            peepholes=True,
            clip=0.9,
            direction="bidirectional",
        ),
        _lstm_case("input_forget_peepholes", peepholes=True, input_forget=1),
        _lstm_case(
            "run_time_length_bidirectional_peepholes_lens",
            dirs=2,
            lens=[3, 4],
            peepholes=True,
            dynamic=True,
            direction="bidirectional",
        ),
        _lstm_case("run_time_length_reverse_input_forget", dynamic=True, input_forget=1, direction="reverse"),
        # an empty row (sequence_lens 0): onnxruntime gives it Y_h = Y_c = 0, not the initial states
        _lstm_case("empty_row_bidirectional", dirs=2, lens=[0, 3], direction="bidirectional"),
        _replace_opset(_lstm_case("opset11_bidirectional_lens", dirs=2, lens=[4, 2], direction="bidirectional"), 11),
        _replace_opset(_lstm_case("opset21_run_time_length", dynamic=True, peepholes=True), 21),
        _lstm_case(
            "bidirectional_activations",
            dirs=2,
            direction="bidirectional",
            activations=["HardSigmoid", "Elu", "Softsign", "Sigmoid", "ScaledTanh", "Softplus"],
            activation_alpha=[0.3, 0.8, 1.5],
            activation_beta=[0.45, 0.7],
        ),
        _lstm_case(
            "affine_leaky",
            activations=["Sigmoid", "LeakyRelu", "Affine"],
            activation_alpha=[0.1, 0.7],
            activation_beta=[0.2],
        ),
    ],
    "GRU": [
        _gru_case("GRU", "forward"),
        _gru_case(
            "GRU",
            "linear_before_reset_bidirectional_lens",
            dirs=2,
            lens=[2, 4],
            linear_before_reset=1,
            direction="bidirectional",
        ),
        _gru_case("GRU", "reverse_clip_lens", lens=[4, 3], clip=0.6, direction="reverse"),
        _gru_case(
            "GRU", "run_time_length_bidirectional_lens", dirs=2, lens=[2, 4], dynamic=True, direction="bidirectional"
        ),
        _gru_case("GRU", "run_time_length_linear_before_reset", dynamic=True, linear_before_reset=1),
        _gru_case("GRU", "run_time_length_empty_row_reverse", lens=[0, 3], dynamic=True, direction="reverse"),
        _gru_case(
            "GRU",
            "activations",
            activations=["HardSigmoid", "Softsign"],
            activation_alpha=[0.25],
            activation_beta=[0.55],
        ),
    ],
    "RNN": [
        _gru_case("RNN", "forward"),
        _gru_case(
            "RNN",
            "bidirectional_lens",
            dirs=2,
            lens=[3, 1],
            direction="bidirectional",
            activations=["Softplus", "ScaledTanh"],
            activation_alpha=[1.2],
            activation_beta=[0.6],
        ),
        _gru_case("RNN", "reverse_clip", clip=0.5, direction="reverse"),
        _gru_case(
            "RNN", "run_time_length_bidirectional_lens", dirs=2, lens=[3, 1], dynamic=True, direction="bidirectional"
        ),
        _gru_case("RNN", "thresholded_relu", activations=["ThresholdedRelu"], activation_alpha=[0.05]),
    ],
}
CASES.update(RECURRENT_CASES)
# layout 1 ([N, T, ...]): onnxruntime refuses it, so tests/test_recurrent.py runs these in onnx's
# reference evaluator, in float64, with default activations (the reference ignores the others)
RECURRENT_LAYOUT1_CASES: dict[str, list[Case]] = {
    "LSTM": [
        _lstm_case("layout1_forward", layout=1),
        _lstm_case("layout1_bidirectional_peepholes", dirs=2, layout=1, peepholes=True, direction="bidirectional"),
    ],
    "GRU": [
        _gru_case("GRU", "layout1_bidirectional", dirs=2, layout=1, direction="bidirectional"),
        _gru_case("GRU", "layout1_reverse_linear_before_reset", layout=1, direction="reverse", linear_before_reset=1),
    ],
    # no Loop path here: onnx 1.23's reference Loop stacks scan outputs with vstack ([T N, ...])
    "RNN": [_gru_case("RNN", "layout1_bidirectional", dirs=2, layout=1, direction="bidirectional")],
}
# Concat at opset 12 (Split takes its sizes as an attribute there; torch's LSTM exports reach it)
CASES["Concat"] = [
    *CASES["Concat"],
    Case("opset12", [x_(rnd(2, 3, 2)), x_(rnd(2, 1, 2, seed=1), "b")], attrs={"axis": 1}, wrt=("x", "b"), opset=12),
    Case(
        "opset12_run_time_sizes",
        [x_(rnd(2, 3, 2)), x_(rnd(2, 1, 2, seed=1), "b")],
        attrs={"axis": 1},
        wrt=("x", "b"),
        opset=12,
        symbolic=(1,),
    ),
]
# -- end recurrent ops ------------------------------------------------------------------------------

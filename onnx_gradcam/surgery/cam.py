"""The Grad-CAM subgraph: target class, seed, backward pass, channel weights, maps.

    α_k = mean_ij ∂y^c/∂A^k_ij,   raw = ReLU(Σ_k α_k A^k),   map = normalise(resize(raw))
(Selvaraju et al., ICCV 2017 / IJCV 2020), y^c the score before softmax. The same backward
pass feeds every method, every feature layer and the counterfactual map (whose gradient is
the negated one); Guided Backprop runs a second backward pass to the input with the guided
ReLU rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto

from ..autodiff.backprop import backprop
from ..autodiff.builder import GraphBuilder
from ..autodiff.context import FLOAT_TYPES, RuleContext, TensorInfo
from ..autodiff.rules.pooling import inverse_spatial_count
from ..errors import BadInputError
from .layout import TOKEN_IDS, Layout, to_canonical
from .methods import METHODS

CLASS_INPUT = "gradcam_class"
SEED_INPUT = "gradcam_seed"
MAP = "gradcam_map"
RAW = "gradcam_raw"
TARGET = "gradcam_target"
SCORE = "gradcam_score"
FEATURES = "gradcam_features"
GRADIENT = "gradcam_gradient"
COUNTERFACTUAL = "counterfactual"
GUIDED_BACKPROP = "gradcam_guided_backprop"
GUIDED = "gradcam_guided"


@dataclass(frozen=True)
class CamSpec:
    """What to compute: methods (first = gradcam_map), layers, and the optional extras."""

    features: tuple[str, ...]
    reduction: str
    methods: tuple[str, ...] = ("gradcam",)
    counterfactual: bool = False
    guided: bool = False
    expose_gradient: bool = False
    target: str = "class"  # "class": one-hot of gradcam_class; "seed": the caller's gradcam_seed
    # integer (QOperator) feature tensors -> (scale, zero point): the CAM reads their dequantization
    dequantize: dict[str, tuple[str, str]] = field(default_factory=dict)
    # feature tensors not in [N, C, grid...] (channels-last, tokens, sequence-first) -> their layout
    layouts: dict[str, Layout] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise BadInputError(f"unknown method {unknown[0]!r}: to fix this, use one of {', '.join(METHODS)}")
        if self.target not in ("class", "seed"):
            raise BadInputError(f"unknown target {self.target!r}: to fix this, use 'class' or 'seed'")
        if not self.methods or not self.features:
            raise BadInputError("at least one method and one feature layer are needed")


@dataclass
class CamOutputs:
    """Public output name -> (internal tensor, element type, dims) in the order they are added."""

    tensors: dict[str, tuple[str, int, Sequence[object]]] = field(default_factory=dict)

    def add(self, public: str, internal: str, dtype: int, dims: Sequence[object]) -> None:
        self.tensors[public] = (internal, dtype, dims)


def spatial_axes(shape: Sequence[object], layout: str) -> list[int]:
    """Spatial axes of the input: [2..] for channels-first, [1..r-2] for channels-last, [1..] for
    integer ids [N, T] (tokens, bytes)."""
    rank = len(shape)
    if layout == TOKEN_IDS:
        return list(range(1, rank))
    return list(range(1, rank - 1)) if layout == "nhwc" else list(range(2, rank))


def class_seed(b: GraphBuilder, info: TensorInfo, logits: str, class_input: str | None) -> tuple[str, str, str]:
    """(seed, target, score): seed = one-hot of the chosen class (top-1 where class < 0, and always
    where there is no class input: --class-input none)."""
    shape = info.shape(logits)
    assert shape is not None
    k = shape[1]
    dtype = info.dtype(logits)
    top1 = b.op("ArgMax", [logits], hint="top1", axis=1, keepdims=0)
    if class_input is None:
        target = top1
    else:
        negative = b.op("Less", [class_input, b.const(np.array(0, np.int64), "zero")])
        target = b.op("Where", [negative, top1, class_input], hint="target")
    column = b.unsqueeze(target, [1])
    if isinstance(k, int):
        classes = b.const(np.arange(k, dtype=np.int64), "classes")
    else:
        classes = b.op(
            "Range",
            [
                b.const(np.array(0, np.int64), "zero"),
                b.squeeze(b.shape_of(logits, 1, 2), [0]),
                b.const(np.array(1, np.int64), "one"),
            ],
        )
    seed = b.op("Cast", [b.op("Equal", [column, classes])], hint="seed", to=dtype)
    score = b.squeeze(b.op("GatherElements", [logits, column], axis=1), [1])
    return seed, target, score


def seed_score(b: GraphBuilder, info: TensorInfo, reduction: str, seed: str) -> str:
    """The caller's scalar score per sample: S = Σ seed ⊙ reduction over the non-batch axes."""
    rank = info.rank(reduction)
    assert rank is not None
    product = b.op("Mul", [seed, reduction])
    return b.reduce("ReduceSum", product, list(range(1, rank)), keepdims=False) if rank > 1 else product


def append_cam(
    ctx: RuleContext,
    nodes: Sequence[onnx.NodeProto],
    image: str,
    layout: str,
    spec: CamSpec,
    target_input: str | None,
) -> CamOutputs:
    """Emit the whole computation; returns the public outputs it produces.

    `target_input` is the gradcam_class input (class target; None: top-1 only, no class input) or
    the gradcam_seed input (seed).
    """
    b, info = ctx.b, ctx.info
    image_shape = info.shape(image)
    assert image_shape is not None
    batch = image_shape[0]
    spatial = [image_shape[i] for i in spatial_axes(image_shape, layout)]
    out = CamOutputs()
    if spec.target == "class":
        seed, target, score = class_seed(b, info, spec.reduction, target_input)
        ctx.one_hot[seed] = target
    else:
        assert target_input is not None
        seed, target, score = target_input, "", seed_score(b, info, spec.reduction, target_input)
    grads = backprop(ctx, nodes, list(spec.features), {spec.reduction: seed})
    dequantized = [
        dequantized_feature(ctx, f, g, spec.dequantize[f]) if f in spec.dequantize else (f, g)
        for f, g in zip(spec.features, grads)
    ]
    exposed = dequantized[0]  # the feature tensor and its gradient as the graph has them
    dequantized = [
        canonical_feature(ctx, f, g, spec.layouts[name]) if name in spec.layouts else (f, g)
        for name, (f, g) in zip(spec.features, dequantized)
    ]
    features = [f for f, _ in dequantized]  # the float [N, C, grid...] tensors the maps are made of
    grads = [g for _, g in dequantized]
    sizes = _map_sizes(b, image, image_shape, layout)
    spatial_static = [d for d in spatial if isinstance(d, int)]

    def maps_for(method: str, negate: bool) -> tuple[str, str, list[str], list[str]]:
        """(combined map, first layer's raw, per-layer maps, per-layer raws) for one method."""
        raws, maps = [], []
        for feature, grad in zip(features, grads):
            g = b.op("Neg", [grad]) if negate else grad
            rank = info.rank(feature)
            assert rank is not None
            if method == "gradcam":
                alpha = _known_spatial_mean(ctx, feature, grad)
                if alpha is not None and negate:
                    alpha = b.op("Neg", [alpha])
                cam = gradcam_weighted_sum(b, info, feature, g, rank, alpha)
            else:
                cam = METHODS[method](b, feature, g, list(range(2, rank)))
            raw = b.op("Relu", [cam], hint="raw")
            raws.append(raw)
            fshape = info.shape(feature) or ()
            feature_spatial = [d for d in fshape[2:] if isinstance(d, int)]
            if len(spatial_static) == len(spatial) == 2 and len(feature_spatial) == len(fshape) - 2 == 2:
                up = upsample_matmul(b, raw, feature_spatial, spatial_static)
            else:
                up = upsample(b, raw, sizes)
            maps.append(normalise(b, up, len(spatial) + 1))
        combined = maps[0] if len(maps) == 1 else normalise(b, b.op("Mean", maps), len(spatial) + 1)
        return combined, raws[0], maps, raws

    first_raw_dims = [batch, *(info.shape(features[0]) or ())[2:]]
    map_dims = [batch, *spatial]
    fl = TensorProto.FLOAT
    first_map = ""
    for i, method in enumerate(spec.methods):
        combined, raw, layer_maps, layer_raws = maps_for(method, negate=False)
        if i == 0:
            first_map = combined
            out.add(MAP, combined, fl, map_dims)
            out.add(RAW, raw, fl, first_raw_dims)
            if len(spec.features) > 1:
                for j, (m, r, f) in enumerate(zip(layer_maps, layer_raws, features)):
                    out.add(f"{MAP}_layer{j}", m, fl, map_dims)
                    out.add(f"{RAW}_layer{j}", r, fl, [batch, *(info.shape(f) or ())[2:]])
        if len(spec.methods) > 1:
            out.add(f"{MAP}_{method}", combined, fl, map_dims)
            out.add(f"{RAW}_{method}", raw, fl, first_raw_dims)
    if spec.counterfactual:
        combined, raw, _, _ = maps_for(spec.methods[0], negate=True)
        out.add(f"{MAP}_{COUNTERFACTUAL}", combined, fl, map_dims)
        out.add(f"{RAW}_{COUNTERFACTUAL}", raw, fl, first_raw_dims)
    if target:
        out.add(TARGET, target, TensorProto.INT64, [batch])
    out.add(SCORE, score, info.dtype(spec.reduction), [batch])
    if spec.guided:
        guided_ctx = RuleContext(b, info, relu_mode="guided")
        gb = backprop(guided_ctx, nodes, image, {spec.reduction: seed})
        channel_axis = len(image_shape) - 1 if layout == "nhwc" else 1
        weighted = b.op("Mul", [gb, b.unsqueeze(first_map, [channel_axis])], hint="guided")
        out.add(GUIDED_BACKPROP, gb, info.dtype(image), list(image_shape))
        out.add(GUIDED, weighted, info.dtype(image), list(image_shape))
    if spec.expose_gradient:
        feat_shape = list(info.shape(exposed[0]) or ())
        out.add(FEATURES, b.value(exposed[0]), info.dtype(exposed[0]), feat_shape)
        out.add(GRADIENT, exposed[1], info.dtype(exposed[0]), feat_shape)
    return out


def canonical_feature(ctx: RuleContext, a: str, grad: str, layout: Layout) -> tuple[str, str]:
    """(A, dS/dA) brought to [N, C, grid...] by the same slice, transpose and reshape (layout.py);
    the cheap forms of the gradient some rules leave (its spatial mean) are for the original
    axes, so the gradient itself is used."""
    b, info = ctx.b, ctx.info
    n, c = layout.shape[layout.roles.index("N")], layout.shape[layout.roles.index("C")]
    shape = tuple(d if isinstance(d, (int, str)) else None for d in (n, c, *layout.grid_sizes))
    pair = []
    for x in (a, grad):
        y = to_canonical(b, x, layout)
        info.shapes[y] = shape
        info.dtypes[y] = info.dtype(a)
        pair.append(y)
    return pair[0], pair[1]


def dequantized_feature(ctx: RuleContext, q: str, grad: str, params: tuple[str, str]) -> tuple[str, str]:
    """(A, dS/dA) for an integer feature tensor q of a QOperator graph: A = (q - zp) s appended,
    and dS/dA = dS/dq / s (the gradient reached q as the derivative by its integer value)."""
    b, info = ctx.b, ctx.info
    scale, zero_point = params
    a = b.op("DequantizeLinear", [q, scale, zero_point], hint="features_dequantized")
    info.shapes[a] = info.shapes.get(q, ())
    info.dtypes[a] = info.dtype(scale) if info.dtype(scale) in FLOAT_TYPES else TensorProto.FLOAT
    before = ctx.rescaled.get(grad)
    if before is not None and before[1] == scale:
        return a, before[0]  # the rule made dS/dq as dS/dA * s: dS/dA itself, exactly
    da = b.op("Div", [grad, scale], hint="gradient_dequantized")
    for known in (ctx.spatial_constant, ctx.channel_sum):  # cheap forms of the gradient carry over
        if grad in known:
            known[da] = b.op("Div", [known[grad], scale])
    return a, da


def _map_sizes(b: GraphBuilder, image: str, image_shape: Sequence[object], layout: str) -> str:
    """[N, 1, *spatial sizes of the image] as a run-time shape for Resize."""
    spatial = b.op(
        "Gather", [b.shape_of(image), b.const(np.array(spatial_axes(image_shape, layout), np.int64), "axes")], axis=0
    )
    return b.op("Concat", [b.shape_of(image, 0, 1), b.const(np.array([1], np.int64), "one"), spatial], axis=0)


def _known_spatial_mean(ctx: RuleContext, feature: str, grad: str) -> str | None:
    """The gradient's spatial mean [N, C, 1, ...] when a rule left it cheaper than ReduceMean of
    the gradient (then the gradient itself is often never computed)."""
    if grad in ctx.spatial_constant:
        return ctx.spatial_constant[grad]
    if grad not in ctx.channel_sum:
        return None
    return ctx.b.op("Mul", [ctx.channel_sum[grad], inverse_spatial_count(ctx, feature)])


def gradcam_weighted_sum(b: GraphBuilder, info: TensorInfo, a: str, g: str, rank: int, alpha: str | None) -> str:
    """Σ_k α_k A_k with α_k = mean_ij G_kij, as one batched MatMul [N,1,C] x [N,C,HW]."""
    if alpha is None:
        alpha = b.reduce("ReduceMean", g, list(range(2, rank)), keepdims=True)
    shape = info.shape(a) or ()
    row = b.op("Reshape", [alpha, b.const(np.array([0, 1, -1], np.int64), "shape")])
    if len(shape) > 1 and isinstance(shape[1], int):
        flat = b.op("Reshape", [a, b.const(np.array([0, shape[1], -1], np.int64), "shape")])
    else:  # channels known only at run time: [N, C] from the tensor itself
        minus_one = b.const(np.array([-1], np.int64), "minus_one")
        flat = b.op("Reshape", [a, b.op("Concat", [b.shape_of(a, 0, 2), minus_one], axis=0)])
    summed = b.op("MatMul", [row, flat])  # [N, 1, HW]
    spatial = info.static_dims(a, 2)
    if spatial is not None:
        out_shape = b.const(np.array([-1, *spatial], np.int64), "shape")
    else:
        out_shape = b.op("Concat", [b.shape_of(a, 0, 1), b.shape_of(a, 2)], axis=0)
    return b.op("Reshape", [summed, out_shape])


def upsample_matmul(b: GraphBuilder, raw: str, src: Sequence[int], dst: Sequence[int]) -> str:
    """Bilinear half-pixel upsampling of [N, h, w] to [N, H, W] as M_h @ raw @ M_w^T, with the
    interpolation matrices of ONNX's own Resize computed at prepare time (static sizes)."""
    from ..autodiff.rules.resize import linear_matrix

    mh = b.const(linear_matrix(src[0], dst[0]).astype(np.float32), "upsample_rows")
    mwt = b.const(linear_matrix(src[1], dst[1]).T.astype(np.float32), "upsample_cols")
    return b.op("MatMul", [b.op("MatMul", [mh, raw]), mwt], hint="upsampled")


def upsample(b: GraphBuilder, raw: str, sizes: str) -> str:
    """Bilinear (linear per axis) with half-pixel centres, to the input's spatial size."""
    up = b.op(
        "Resize",
        [b.unsqueeze(raw, [1]), "", "", sizes],
        hint="upsampled",
        mode="linear",
        coordinate_transformation_mode="half_pixel",
    )
    return b.squeeze(up, [1])


def normalise(b: GraphBuilder, x: str, rank: int) -> str:
    """Per-sample min-max to [0, 1]; a constant map becomes all zeros (no 0/0).

    map = (x - min) / max(max - min, t), t the smallest normal float32 (1.2e-38): scale-invariant
    for any map whose range is a normal number; a constant map gives 0 / t = 0.
    """
    axes = list(range(1, rank))
    lo = b.reduce("ReduceMin", x, axes, keepdims=True)
    hi = b.reduce("ReduceMax", x, axes, keepdims=True)
    tiny = b.const(np.array(np.finfo(np.float32).tiny, np.float32), "tiny")
    span = b.op("Max", [b.op("Sub", [hi, lo]), tiny])
    return b.op("Div", [b.op("Sub", [x, lo]), span], hint="map")

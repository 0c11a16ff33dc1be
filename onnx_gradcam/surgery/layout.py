"""What each axis of a tensor means, found from the graph: batch, channels, which axis of the
image grid, or a token axis that flattens the grid (with class or distillation tokens first).

Roles start at the image input and follow the ops forward: Conv and pooling read axis 1 as
channels and axes 2.. as the grid, Transpose permutes roles, Reshape/Flatten/Squeeze merge and
split them by their static sizes, Concat with a class token extends a token axis, MatMul by a
weight keeps the leading axes and makes the last one channels. A tensor whose roles are not all
known has no layout: Grad-CAM on it is an error that asks for `--layout`, never a wrong map.

Every feature tensor is brought to [N, C, g_0, g_1, ...], one grid axis per spatial axis of the
image (size 1 where the tensor has none, e.g. a CRNN's sequence over the width), by the same
ops on the activation and its gradient. α_k then averages over the grid whatever the original
layout, and extra tokens are dropped before it (pytorch-grad-cam's `reshape_transform`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from ..autodiff.builder import GraphBuilder
from ..autodiff.context import TensorInfo
from ..errors import LayerNotFoundError

BATCH, CHANNELS, ONE, UNKNOWN, DIRECTIONS = "N", "C", "1", "?", "D"
Roles = tuple[str, ...]

# --layout values a user can give for a feature tensor the graph does not explain
CHOICES = ("nchw", "nhwc", "tokens", "sequence-first")


def grid(i: int) -> str:
    return f"S{i}"


def tokens(extra: int, sizes: Sequence[int]) -> str:
    """A token axis: `extra` class/distillation tokens, then the grid `sizes` flattened row-major."""
    return "T" + ":".join(str(v) for v in (extra, *sizes))


def parse_tokens(role: str) -> tuple[int, tuple[int, ...]] | None:
    """(extra tokens, grid sizes) of a token axis (extra -1: not yet counted), None for others."""
    if not role.startswith("T"):
        return None
    values = [int(v) for v in role[1:].split(":")]
    return values[0], tuple(values[1:])


_OFFSET = "~"  # a position within a cell of a coarser grid (space-to-depth, patch merging)


def is_grid(role: str) -> bool:
    return role.startswith("S") and not role.endswith(_OFFSET)


TOKEN_IDS = "nt"  # the layout of an integer input [N, T]: token ids or bytes, one grid axis


def image_layout(shape: Sequence[object], token_ids: bool = False) -> str:
    """The input's layout: 'nt' for integer ids [N, T], else 'nchw' unless the last axis looks like
    channels (1, 3 or 4) and axis 1 does not (a TensorFlow export's [N, H, W, C])."""
    if token_ids:
        return TOKEN_IDS
    if len(shape) == 4 and shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4):
        return "nhwc"
    return "nchw"


def spatial_rank(shape: Sequence[object], layout: str) -> int:
    """How many grid axes the input has: T for ids [N, T], all but N and C otherwise."""
    return len(shape) - 1 if layout == TOKEN_IDS else len(shape) - 2


def image_roles(rank: int, layout: str) -> Roles:
    """The input's roles: NC + grid, N + grid + C (channels-last), or N + T (ids; the embedding
    adds the channels)."""
    if layout == TOKEN_IDS:
        return (BATCH, *(grid(i) for i in range(rank - 1)))
    spatial = tuple(grid(i) for i in range(rank - 2))
    return (BATCH, *spatial, CHANNELS) if layout == "nhwc" else (BATCH, CHANNELS, *spatial)


_ELEMENTWISE = {
    "Relu", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh",
    "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Clip", "Abs", "Neg", "Exp", "Log", "Sqrt", "Reciprocal",
    "Pow", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum", "Mean", "Where", "Cast", "CastLike", "Identity",
    "Dropout", "QuantizeLinear", "DequantizeLinear", "Softmax", "LogSoftmax", "LayerNormalization",
    "BatchNormalization", "InstanceNormalization", "LRN", "Floor", "Ceil", "Round", "Sign", "ThresholdedRelu",
    "QLinearAdd", "QLinearMul", "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "Resize", "Upsample",
    "Pad", "Shrink", "BiasGelu", "FastGelu", "QuickGelu", "SkipLayerNormalization", "SimplifiedLayerNormalization",
}  # fmt: skip
_CONV_LIKE = {
    "Conv", "ConvTranspose", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool",
    "QLinearAveragePool", "MaxUnpool",
}  # fmt: skip
_GLOBAL_POOL = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "QLinearGlobalAveragePool"}
_RESHAPING = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceL1", "ReduceProd"}
_RECURRENT = {"LSTM", "GRU", "RNN"}
# ops whose roles are read below, or that move values between positions (never "elementwise")
_HANDLED = (
    _CONV_LIKE
    | _GLOBAL_POOL
    | _RESHAPING
    | _REDUCE
    | _RECURRENT
    | {"Transpose", "MatMul", "MatMulInteger", "QLinearMatMul", "Gemm", "QGemm", "Concat", "Gather", "Slice"}
    | {"Split", "Einsum", "ReverseSequence", "DepthToSpace", "SpaceToDepth", "Tile", "Expand", "CumSum"}
    | {"GatherElements", "GatherND", "ScatterElements", "ScatterND", "TopK", "Compress", "NonZero", "Col2Im"}
    | {"QLinearConcat", "Shape", "Size", "ArgMax", "ArgMin", "GridSample", "RoiAlign", "MaxRoiPool"}
)


def propagate(nodes: Sequence[onnx.NodeProto], info: TensorInfo, image: str, layout: str) -> dict[str, Roles]:
    """Roles of every tensor the ops explain, from the image input forward."""
    rank = info.rank(image) or 4
    roles: dict[str, Roles] = {image: image_roles(rank, layout)}
    dynamic = {image}  # tensors that depend on the image; the others are weights and constants
    grid_rank = rank - 1 if layout == TOKEN_IDS else rank - 2
    for node in nodes:
        if not any(i in dynamic for i in node.input):
            continue
        dynamic.update(o for o in node.output if o)
        try:
            outs = _embedding_roles(node, info, roles, dynamic)
            if outs is None:
                outs = _node_roles(node, info, roles, dynamic, grid_rank)
        except (ValueError, IndexError, TypeError, KeyError):  # an attribute or shape this reading does not cover
            outs = {}
        for name, r in outs.items():
            shape = info.shape(name)
            if name and r is not None and (shape is None or len(shape) == len(r)):
                roles[name] = _counted(r, shape)
    return roles


def _embedding_roles(
    node: onnx.NodeProto, info: TensorInfo, roles: dict[str, Roles], dynamic: set[str]
) -> dict[str, Roles | None] | None:
    """Roles made by an embedding of ids (None for other nodes): Gather from a table keeps the ids'
    roles and makes the table's row the channels; OneHot, or Equal of ids [.., 1] with a constant
    [K], adds the class axis as channels."""
    op = node.op_type
    out = node.output[0] if node.output else ""
    if op == "Gather" and node.input[0] not in dynamic and node.input[1] in roles:
        table = info.shape(node.input[0])
        axis = _attr(node, "axis", 0) % len(table) if table else 0
        if table is None or len(table) - axis - 1 != 1:  # one axis left of each row: the channels
            return {}
        return {out: (*([UNKNOWN] * axis), *roles[node.input[1]], CHANNELS)}
    if op == "OneHot" and node.input[0] in roles and node.input[1] not in dynamic:
        ids = roles[node.input[0]]
        axis = _attr(node, "axis", -1) % (len(ids) + 1)
        return {out: (*ids[:axis], CHANNELS, *ids[axis:])}
    if op == "Equal":
        known = [i for i in node.input if i in roles]
        constant = [i for i in node.input if i not in dynamic]
        shape, oshape = (info.shape(known[0]) if known else None), info.shape(out)
        if len(known) != 1 or len(constant) != 1 or shape is None or oshape is None or len(shape) != len(oshape):
            return None
        added = [a for a, (d, o) in enumerate(zip(shape, oshape)) if d == 1 and o != 1]
        if len(added) != 1:
            return None
        ids = roles[known[0]]
        return {out: tuple(CHANNELS if a == added[0] else r for a, r in enumerate(ids))}
    return None


def _broadcast(shape: Sequence[object] | None, out: Sequence[object]) -> bool:
    """True if `shape` has size 1 on an axis where the output's size is another number."""
    return shape is not None and any(d == 1 and o != 1 for d, o in zip(shape, out))


def _node_roles(
    node: onnx.NodeProto, info: TensorInfo, roles: dict[str, Roles], dynamic: set[str], spatial_rank: int
) -> dict[str, Roles | None]:
    op = node.op_type
    ins = [roles.get(i) for i in node.input]
    out = node.output[0] if node.output else ""
    oshape = info.shape(out)
    if (op in _ELEMENTWISE or op not in _HANDLED) and oshape is not None:
        # an op of unknown meaning that keeps the shape of its input keeps its roles (Sin, Gelu of a
        # newer opset, a custom activation); ops that move values between positions are in _HANDLED
        full = [(i, r) for i, r in zip(node.input, ins) if r is not None and len(r) == len(oshape)]
        # a broadcast operand (size 1 where the output is not: SE's [N, C, 1, 1]) does not decide
        full = [(i, r) for i, r in full if not _broadcast(info.shape(i), oshape)]
        if not full:
            return {}
        # position-wise ops align their operands: an axis one of them lost (Swin's rolled and
        # cropped windows) has the role the other gives it; two different roles are unknown
        merged = []
        for a in range(len(oshape)):
            known = {r[a] for _, r in full if r[a] != UNKNOWN}
            merged.append(known.pop() if len(known) == 1 else UNKNOWN)
        return {out: tuple(merged)}
    x = ins[0] if ins else None
    if op in _CONV_LIKE:
        if x is not None and len(x) >= 3 and all(is_grid(r) or r == ONE for r in x[2:]):
            return {out: (BATCH, CHANNELS, *x[2:])}
        if oshape is not None and len(oshape) == spatial_rank + 2:
            return {out: (BATCH, CHANNELS, *(grid(i) for i in range(spatial_rank)))}
        return {}
    if op in _GLOBAL_POOL:
        if op == "QLinearGlobalAveragePool" and _attr(node, "channels_last", 0):
            return {out: (BATCH, *([ONE] * (len(oshape or ()) - 2)), CHANNELS)} if oshape else {}
        return {out: (BATCH, CHANNELS, *([ONE] * (len(oshape or ()) - 2)))} if oshape else {}
    if op == "Concat":  # the class token, a parameter, comes first and has no roles
        return {out: _concat(node, info, ins)}
    if op == "Einsum":
        return {out: _einsum(node, roles, dynamic)}
    if x is None:
        return {}
    if op in ("Expand", "Tile", "GatherElements"):
        return {out: _copied(node, info, x, oshape)}
    if op == "Transpose":
        perm = _attr(node, "perm", list(reversed(range(len(x)))))
        return {out: tuple(x[p] for p in perm)}
    if op in _RESHAPING:
        return {out: reshaped(x, _sized(x, info.shape(node.input[0])), oshape)}
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        weight = node.input[3 if op == "QLinearMatMul" else 1]
        if weight not in dynamic and oshape is not None and len(oshape) == len(x):
            return {out: (*x[:-1], CHANNELS)}  # x W: a linear map of the last axis
        y = roles.get(weight)
        if op == "MatMul" and y is not None and len(y) == len(x) >= 2 and x[:-2] == y[:-2]:
            # two activations (attention: Q K^T, then weights times V): A's rows, B's columns
            return {out: (*x[:-2], x[-2], y[-1])}
        return {}
    if op in ("Gemm", "QGemm"):
        return {out: (BATCH, CHANNELS)} if x and x[0] == BATCH else {}
    if op in _REDUCE:
        axes = reduce_axes(node, info, len(x))
        if axes is None:
            return {}
        keep = _attr(node, "keepdims", 1)
        return {out: tuple(ONE if a in axes else r for a, r in enumerate(x)) if keep else
                tuple(r for a, r in enumerate(x) if a not in axes)}  # fmt: skip
    if op == "Gather":
        indices = _ints(info, node.input[1])
        axis = _attr(node, "axis", 0) % len(x)
        if indices is None:
            return {}
        kept = list(x)
        if indices.ndim == 0:
            del kept[axis]
            return {out: tuple(kept)}
        kept[axis] = UNKNOWN
        return {out: tuple(kept[:axis] + [UNKNOWN] * indices.ndim + kept[axis + 1 :])}
    if op == "Slice":
        return {out: _sliced(node, info, x)}
    if op == "Split":
        axis = _attr(node, "axis", 0) % len(x)
        r = tuple(UNKNOWN if a == axis and x[a] != CHANNELS else v for a, v in enumerate(x))
        return {o: r for o in node.output if o}
    if op in _RECURRENT:
        layout_attr = _attr(node, "layout", 0)
        seq, batch = (x[1], x[0]) if layout_attr else (x[0], x[1])
        if batch != BATCH:
            return {}
        y = (BATCH, seq, DIRECTIONS, CHANNELS) if layout_attr else (seq, DIRECTIONS, BATCH, CHANNELS)
        return {out: y} if out else {}
    return {}


def _copied(node: onnx.NodeProto, info: TensorInfo, x: Roles, oshape: Sequence[Any] | None) -> Roles | None:
    """Expand, Tile, GatherElements: an axis keeps its role where its positions stay where they
    were (not broadcast from size 1, not tiled, not the gathered axis); the others are unknown."""
    shape = info.shape(node.input[0])
    if node.op_type == "Expand":
        if oshape is None or shape is None or len(oshape) < len(x):
            return None
        lead = len(oshape) - len(x)
        kept = [r if shape[a] != 1 or oshape[lead + a] == 1 else UNKNOWN for a, r in enumerate(x)]
        return (*([UNKNOWN] * lead), *kept)
    if node.op_type == "Tile":
        repeats = _ints(info, node.input[1])
        if repeats is None or len(repeats) != len(x):
            return None
        return tuple(r if int(k) == 1 else UNKNOWN for r, k in zip(x, repeats))
    axis = int(_attr(node, "axis", 0)) % len(x)
    index = info.shape(node.input[1])
    if shape is None or index is None or len(index) != len(x):
        return None
    same = [index[a] is not None and index[a] == shape[a] for a in range(len(x))]
    return tuple(r if a != axis and same[a] else UNKNOWN for a, r in enumerate(x))


def _einsum(node: onnx.NodeProto, roles: dict[str, Roles], dynamic: set[str]) -> Roles | None:
    """An output letter has the role its activation operands agree on; the one output letter
    that only weights carry (nchw,oc->nohw: a linear map of the channels) is channels."""
    equation = str(_attr(node, "equation", b"").decode()).replace(" ", "")
    if "..." in equation or "->" not in equation:
        return None
    lhs, out = equation.split("->")
    terms = lhs.split(",")
    found: dict[str, set[str]] = {}
    in_activation: set[str] = set()
    for term, name in zip(terms, node.input):
        if name in dynamic:
            in_activation.update(term)
        r = roles.get(name)
        if r is None or len(r) != len(term):
            continue
        for c, role in zip(term, r):
            found.setdefault(c, set()).add(role)
    weights_only = [c for c in out if c not in in_activation]
    result = []
    for c in out:
        known = found.get(c, set()) - {UNKNOWN}
        if len(known) == 1:
            result.append(known.pop())
        elif c in weights_only and len(weights_only) == 1:
            result.append(CHANNELS)
        else:
            result.append(UNKNOWN)
    return tuple(result)


def _ints(info: TensorInfo, name: str) -> np.ndarray | None:
    """An integer input's value at prepare time: a constant, or what a shape subgraph computes."""
    value = info.const(name)
    if value is None and name in info.folded:
        value = np.array(info.folded[name], np.int64)
    return value


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def reduce_axes(node: onnx.NodeProto, info: TensorInfo, rank: int) -> set[int] | None:
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = _ints(info, node.input[1])
        if value is None:
            return None
        axes = value.tolist()
    if not axes:  # none given, or an empty list: all axes, unless noop_with_empty_axes (the identity)
        return set() if _attr(node, "noop_with_empty_axes", 0) else set(range(rank))
    return {int(a) % rank for a in axes}  # type: ignore[union-attr]


def reshaped(x: Roles, before: Sequence[Any] | None, after: Sequence[Any] | None) -> Roles | None:
    """Roles after a reshape, by matching groups of axes whose sizes multiply to the same number.

    Merging grid axes in order makes a token axis; splitting a token axis into its grid sizes
    gives the grid back; merging the directions of a recurrent output into its channels keeps
    channels. Anything else (the batch folded with windows, channels split into heads) is unknown.
    """
    if before is None or after is None or len(before) != len(x):
        return None
    after = _resolved(before, after)
    # size-1 axes carry nothing, except a batch of 1: it pairs with the size-1 axis of the output
    # that has as many other axes before it
    src = [(d, r) for d, r in zip(before, x) if d != 1 or r == BATCH]
    dst_dims = list(after)
    dst_keep = [i for i, d in enumerate(dst_dims) if d != 1]
    batch_at = next((k for k, (d, r) in enumerate(src) if r == BATCH and d == 1), None)
    if batch_at is not None:
        seen = 0
        for k, d in enumerate(dst_dims):
            if d == 1 and seen == batch_at:
                dst_keep = sorted([*dst_keep, k])
                break
            seen += d != 1
        else:
            return None
    dims = [dst_dims[i] for i in dst_keep]
    out: list[str] = [ONE] * len(dst_dims)
    if not src and not dims:
        return tuple(out)
    # symbolic sizes (the batch) pair up one to one when the static sizes after them agree; else
    # static axes were folded into the batch (LeViT's BatchNorm over [N·T, C]) or unfolded from it
    i = j = 0
    mapped: list[str] = []
    while i < len(src) and j < len(dims):
        pi, pj = src[i][0], dims[j]
        if not isinstance(pi, int) or not isinstance(pj, int):
            if isinstance(pi, int) or isinstance(pj, int):
                return None
            rest_src = _static_product([d for d, _ in src[i + 1 :]])
            rest_dst = _static_product(dims[j + 1 :])
            if pi == pj or (rest_src is not None and rest_src == rest_dst):
                mapped.append(src[i][1])
                i, j = i + 1, j + 1
            elif rest_src is None or rest_dst is None:
                return None
            elif rest_src > rest_dst:
                k, merged = i + 1, 1
                while k < len(src) and merged * rest_dst < rest_src:
                    merged *= int(src[k][0])
                    k += 1
                if merged * rest_dst != rest_src:
                    return None
                mapped.append(_folded(src[i][1], src[i + 1 : k]))
                i, j = k, j + 1
            else:
                parts = _unfolded(src[i][1])
                sizes = [size for _, size in parts]
                if not parts or list(dims[j + 1 : j + 1 + len(sizes)]) != sizes:
                    return None
                mapped.append(_base(src[i][1]))
                mapped.extend(r for r, _ in parts)
                i, j = i + 1, j + 1 + len(sizes)
            continue
        gi, gj = [src[i]], [pj]
        while pi != pj:
            if pi < pj:
                i += 1
                if i >= len(src) or not isinstance(src[i][0], int):
                    return None
                gi.append(src[i])
                pi *= src[i][0]
            else:
                j += 1
                if j >= len(dims) or not isinstance(dims[j], int):
                    return None
                gj.append(dims[j])
                pj *= dims[j]
        mapped.extend(_regroup([r for _, r in gi], [int(d) for d, _ in gi], [int(d) for d in gj]))
        i += 1
        j += 1
    if i != len(src) or j != len(dims):
        return None
    for k, role in zip(dst_keep, mapped):
        out[k] = role
    return tuple(out)


def _sized(roles: Roles, shape: Sequence[Any] | None) -> list[Any] | None:
    """`shape` with the sizes of token axes that shape inference left unknown, from their roles."""
    if shape is None:
        return None
    out = list(shape)
    for k, role in enumerate(roles):
        parsed = parse_tokens(role)
        if parsed is not None and parsed[0] >= 0 and not isinstance(out[k], int):
            out[k] = parsed[0] + math.prod(parsed[1])
    return out


def _resolved(before: Sequence[Any], after: Sequence[Any]) -> list[Any]:
    """`after` with one size that shape inference left unknown computed from the element count,
    as a Reshape's -1 is (the batch, symbolic, on both sides)."""

    def unknown(d: Any) -> bool:
        return d is None or (isinstance(d, str) and d.startswith("unk__"))

    out = list(after)
    holes = [k for k, d in enumerate(out) if unknown(d)]
    symbolic_in = [d for d in before if not isinstance(d, int)]
    symbolic_out = [d for d in out if not isinstance(d, int) and not unknown(d)]
    if len(holes) != 1 or len(symbolic_in) != len(symbolic_out) + (1 if holes[0] == 0 else 0):
        return out
    total = _static_product([d for d in before if isinstance(d, int)])
    rest = _static_product([d for d in out if isinstance(d, int)])
    if holes[0] != 0 and total is not None and rest and total % rest == 0 and len(symbolic_in) == len(symbolic_out):
        out[holes[0]] = total // rest
    return out


def _folded(role: str, parts: Sequence[tuple[Any, str]]) -> str:
    """A symbolic axis with static axes folded into it, e.g. the batch times the tokens."""
    return "*".join([role, *(f"{r}@{d}" for d, r in parts)])


def _base(role: str) -> str:
    return role.split("*")[0]


def _unfolded(role: str) -> list[tuple[str, int]]:
    """The (role, size) of the axes folded into `role`; empty if none were."""
    return [(r, int(d)) for r, d in (p.rsplit("@", 1) for p in role.split("*")[1:])]


def _static_product(dims: Sequence[Any]) -> int | None:
    return math.prod(int(d) for d in dims) if all(isinstance(d, int) for d in dims) else None


def _regroup(src_roles: list[str], src_sizes: list[int], dst_sizes: list[int]) -> list[str]:
    if len(src_roles) == 1 and len(dst_sizes) == 1:
        return src_roles
    if len(dst_sizes) == 1:  # a merge
        if src_roles == [grid(i) for i in range(len(src_roles))]:  # the whole grid, row-major: tokens
            return [tokens(0, src_sizes)]
        if all(r.startswith(CHANNELS + ":") for r in src_roles):  # attention heads merged back
            return [CHANNELS]
        if len(src_roles) == 2 and is_grid(src_roles[0]) and src_roles[1] == src_roles[0] + _OFFSET:
            return [src_roles[0]]  # cells and the offsets in them: the axis again (Swin's window reverse)
        if src_roles[-1] == CHANNELS and all(r.endswith(_OFFSET) for r in src_roles[:-1]):
            return [CHANNELS]  # offsets within grid cells folded into channels (Swin's patch merging)
        if src_roles[0] in (CHANNELS, DIRECTIONS) and all(is_grid(r) or r == CHANNELS for r in src_roles[1:]):
            # channels with grid axes folded in (a CRNN's [C, H] as features of each column), or a
            # recurrent output's directions with its channels: channels
            return [CHANNELS] if src_roles.count(CHANNELS) == 1 else [UNKNOWN]
        return [UNKNOWN]
    if len(src_roles) == 1:  # a split
        parsed = parse_tokens(src_roles[0])
        if parsed is not None and parsed[0] == 0 and tuple(dst_sizes) == parsed[1]:
            return [grid(i) for i in range(len(dst_sizes))]
        if src_roles[0] == CHANNELS:  # channels split into (q/k/v,) heads and head channels
            return [f"{CHANNELS}:{k}" for k in range(len(dst_sizes))]
        if is_grid(src_roles[0]) and len(dst_sizes) == 2:  # a grid axis into cells and offsets in them
            return [src_roles[0], src_roles[0] + _OFFSET]
    return [UNKNOWN] * len(dst_sizes)


def _concat(node: onnx.NodeProto, info: TensorInfo, ins: list[Roles | None]) -> Roles | None:
    known = [(k, r) for k, r in enumerate(ins) if r is not None]
    if not known:
        return None
    rank = len(known[0][1])
    axis = int(_attr(node, "axis", 0)) % rank  # type: ignore[call-overload]
    base = known[0][1]
    if any(len(r) != rank or any(a != b for n, (a, b) in enumerate(zip(r, base)) if n != axis) for _, r in known):
        return None
    along = [r[axis] for _, r in known]
    if all(a == CHANNELS for a in along) and len(known) == len(ins):
        return base
    token_inputs = [k for k, r in known if parse_tokens(r[axis]) is not None]
    if len(token_inputs) == 1 and token_inputs[0] == len(ins) - 1:  # class tokens prepended
        extra, sizes = parse_tokens(ins[-1][axis])  # type: ignore[index, misc]
        before = [(info.shape(node.input[k]) or (None,) * rank)[axis] for k in range(len(ins) - 1)]
        counts = [d for d in before if isinstance(d, int)]
        if extra >= 0 and len(counts) == len(before):
            extra += sum(counts)
        else:  # their count is unknown here (an Expand of run-time shape); a later shape tells it
            extra = -1
        return tuple(tokens(extra, sizes) if n == axis else r for n, r in enumerate(base))
    return tuple(UNKNOWN if n == axis else r for n, r in enumerate(base))


def _counted(roles: Roles, shape: Sequence[Any] | None) -> Roles:
    """Token axes whose count of extra tokens was unknown, counted from a static size."""
    if shape is None:
        return roles
    out = list(roles)
    for a, r in enumerate(roles):
        parsed = parse_tokens(r)
        if parsed is not None and parsed[0] < 0 and isinstance(shape[a], int):
            out[a] = tokens(int(shape[a]) - math.prod(parsed[1]), parsed[1])  # type: ignore[call-overload]
    return tuple(out)


def _sliced(node: onnx.NodeProto, info: TensorInfo, x: Roles) -> Roles | None:
    shape = info.shape(node.input[0])
    if shape is None:
        return None
    if len(node.input) > 1:
        starts, ends = _ints(info, node.input[1]), _ints(info, node.input[2])
        axes = _ints(info, node.input[3]) if len(node.input) > 3 and node.input[3] else None
        steps = _ints(info, node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None:  # bounds of run-time value (torch's chunk): by the shapes
            after = info.shape(node.output[0])
            if after is None or len(after) != len(x):
                return None
            symbolic = [not isinstance(d, int) and not isinstance(e, int) for d, e in zip(shape, after)]
            return tuple(r if d == e or r == CHANNELS or (r == BATCH and both) else UNKNOWN
                         for r, d, e, both in zip(x, shape, after, symbolic))  # fmt: skip
        starts_l, ends_l = starts.tolist(), ends.tolist()
        axes_l = axes.tolist() if axes is not None else list(range(len(starts_l)))
        steps_l = steps.tolist() if steps is not None else [1] * len(starts_l)
    else:
        starts_l, ends_l = list(_attr(node, "starts", [])), list(_attr(node, "ends", []))
        axes_l = list(_attr(node, "axes", list(range(len(starts_l)))))
        steps_l = [1] * len(starts_l)
    out = list(x)
    for a, s, e, step in zip(axes_l, starts_l, ends_l, steps_l):
        a = int(a) % len(x)
        size = shape[a]
        to_end = e >= 2**31 - 1 or (isinstance(size, int) and e >= size)
        parsed = parse_tokens(x[a])
        if (s == 0 and to_end and step == 1) or (is_grid(x[a]) and to_end and 0 <= s < step):
            continue  # the whole axis, or a grid subsampled by a stride (LeViT's downsampling, Swin's merging)
        if parsed is not None and step == 1 and 0 < s <= parsed[0] and to_end:
            out[a] = tokens(parsed[0] - s, parsed[1])  # dropping class tokens
        elif x[a] != CHANNELS:
            out[a] = UNKNOWN  # a crop, or the class tokens alone: no grid
    return tuple(out)


@dataclass(frozen=True)
class Layout:
    """How a feature tensor's axes map onto [N, C, grid...]."""

    roles: Roles
    shape: tuple[Any, ...]
    spatial_rank: int  # the image's

    @property
    def label(self) -> str:
        """NCHW, NHWC, `tokens 1+14x14`, sequence-first, ..."""
        r = self.roles
        tok = [t for t in (parse_tokens(x) for x in r) if t is not None]
        if r[0] != BATCH:
            return "sequence-first"
        if tok:
            extra, sizes = tok[0]
            grid_text = "x".join(str(s) for s in sizes)
            return f"tokens {extra}+{grid_text}" if extra else f"tokens {grid_text}"
        letters = {1: "T", 2: "HW", 3: "DHW"}.get(self.spatial_rank, "")
        named = {BATCH: "N", CHANNELS: "C", ONE: "1", DIRECTIONS: "1"}
        named.update({grid(i): letter for i, letter in enumerate(letters)})
        return "".join(named.get(x, "?") for x in r)

    @property
    def grid_sizes(self) -> list[Any]:
        """The sizes of the canonical grid axes [g_0, ...] (1 where the tensor has no such axis)."""
        sizes: list[Any] = [1] * self.spatial_rank
        for role, dim in zip(self.roles, self.shape):
            parsed = parse_tokens(role)
            if parsed is not None:
                for i, s in enumerate(parsed[1]):
                    sizes[i] = s
            elif is_grid(role):
                sizes[int(role[1:])] = dim
        return sizes

    @property
    def is_identity(self) -> bool:
        return self.roles == (BATCH, CHANNELS, *(grid(i) for i in range(self.spatial_rank)))

    def spatial_size(self) -> int | None:
        sizes = self.grid_sizes
        return math.prod(int(s) for s in sizes) if all(isinstance(s, int) for s in sizes) else None


def layout_of(roles: Roles | None, shape: Sequence[Any] | None, spatial_rank: int) -> Layout | None:
    """The layout of a tensor whose roles are known: one batch axis, one channel axis, the rest
    grid axes (each at most once), one token axis, or size-1 axes; None otherwise."""
    if roles is None or shape is None or len(roles) != len(shape):
        return None
    if roles.count(BATCH) != 1 or roles.count(CHANNELS) != 1:
        return None
    seen: set[str] = set()
    for role, dim in zip(roles, shape):
        if role in (BATCH, CHANNELS):
            continue
        if role == ONE or (role == DIRECTIONS and dim == 1):
            continue
        parsed = parse_tokens(role)
        if parsed is not None:
            if "tokens" in seen or len(parsed[1]) != spatial_rank or parsed[0] < 0:
                return None
            seen.add("tokens")
            continue
        if not is_grid(role) or role in seen or int(role[1:]) >= spatial_rank:
            return None
        seen.add(role)
    if "tokens" in seen and len(seen) > 1:
        return None
    return Layout(tuple(roles), tuple(shape), spatial_rank)


def given_layout(choice: str, shape: Sequence[Any], spatial_rank: int, image_spatial: Sequence[Any]) -> Layout:
    """The layout a user names with --layout for a tensor of `shape`."""
    rank = len(shape)
    choice = choice.lower()
    spatial = [grid(i) for i in range(spatial_rank)]
    if choice == "nchw" and rank == spatial_rank + 2:
        return Layout((BATCH, CHANNELS, *spatial), tuple(shape), spatial_rank)
    if choice == "nhwc" and rank == spatial_rank + 2:
        return Layout((BATCH, *spatial, CHANNELS), tuple(shape), spatial_rank)
    if choice == "sequence-first" and rank == 3:
        # [T, N, C]: a sequence along the image's last axis (a text line read left to right)
        return Layout((grid(spatial_rank - 1), BATCH, CHANNELS), tuple(shape), spatial_rank)
    if choice == "tokens" and rank == 3 and isinstance(shape[1], int):
        sizes = token_grid(int(shape[1]), image_spatial)
        if sizes is not None:
            return Layout((BATCH, tokens(*sizes), CHANNELS), tuple(shape), spatial_rank)
    raise LayerNotFoundError(
        f"--layout {choice} does not fit a feature tensor of shape {list(shape)}: to fix this, use nchw or nhwc "
        f"for rank {spatial_rank + 2}, tokens for [N, tokens, C] on a square-ish grid, sequence-first for [T, N, C]"
    )


def token_grid(count: int, image_spatial: Sequence[Any]) -> tuple[int, tuple[int, int]] | None:
    """(extra tokens, (h, w)) for `count` tokens of a 2-D image: the fewest extra tokens (at most
    8) whose remainder is a grid of the image's aspect ratio."""
    if len(image_spatial) != 2 or not all(isinstance(d, int) for d in image_spatial):
        return None
    height, width = int(image_spatial[0]), int(image_spatial[1])  # type: ignore[call-overload]
    for extra in range(0, 9):
        n = count - extra
        if n <= 0:
            break
        h = round(math.sqrt(n * height / width))
        if h > 0 and n % h == 0 and abs(h / (n // h) - height / width) < 1e-6:
            return extra, (h, n // h)
    return None


def to_canonical(b: GraphBuilder, x: str, layout: Layout) -> str:
    """x as [N, C, g_0, ...]: extra tokens sliced off, axes transposed, a token axis reshaped to
    its grid, missing grid axes inserted with size 1. The same ops serve an activation and its
    gradient (all are linear), so α and the map see the grid in image order."""
    roles = list(layout.roles)
    token_axis = next((a for a, r in enumerate(roles) if parse_tokens(r) is not None), None)
    if token_axis is not None:
        extra, sizes = parse_tokens(roles[token_axis])  # type: ignore[misc]
        if extra:
            x = _slice(b, x, token_axis, extra)
            roles[token_axis] = tokens(0, sizes)
    order = [roles.index(BATCH), roles.index(CHANNELS)]
    body = sorted(
        (a for a, r in enumerate(roles) if is_grid(r) or parse_tokens(r) is not None),
        key=lambda a: 0 if parse_tokens(roles[a]) is not None else int(roles[a][1:]),
    )
    order += body
    order += [a for a in range(len(roles)) if a not in order]  # size-1 axes, dropped below
    if order != list(range(len(roles))):
        x = b.transpose(x, order)
    grid_sizes = layout.grid_sizes
    present = {int(roles[a][1:]) for a in body if is_grid(roles[a])}
    if token_axis is None and len(order) == len(body) + 2 and len(present) == layout.spatial_rank:
        return x
    if token_axis is None and len(order) == len(body) + 2:
        missing = [i for i in range(layout.spatial_rank) if i not in present]
        return b.unsqueeze(x, [2 + i for i in missing])
    # a token axis or size-1 axes: one Reshape to [N, C, g_0, ...]
    channels = layout.shape[roles.index(CHANNELS)]
    if all(isinstance(s, int) for s in grid_sizes):
        target = b.const(np.array([0, channels if isinstance(channels, int) else -1, *grid_sizes], np.int64), "shape")
    else:
        raise LayerNotFoundError("a token grid of run-time size: to fix this, export the model with a fixed image size")
    return b.op("Reshape", [x, target])


def _slice(b: GraphBuilder, x: str, axis: int, start: int) -> str:
    end = np.iinfo(np.int64).max
    if b.opset >= 10:
        consts = [np.array([v], np.int64) for v in (start, end, axis)]
        return b.op("Slice", [x, *(b.const(c, n) for c, n in zip(consts, ("starts", "ends", "axes")))])
    return b.op("Slice", [x], starts=[start], ends=[int(2**31 - 1)], axes=[axis])

"""Sanity check of maps (Adebayo et al., NeurIPS 2018): cascading randomisation of the model's
weights from the logits downward, on the ONNX model's stored weights (float or int8), and the rank
correlation of the maps."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import BadInputError
from ..explain.explainer import Explainer
from ..explain.verify import verify_prepared
from ..surgery.forward import forward_model
from ..surgery.prepare import META_PREFIX, Preprocess, prepare_model
from .base import EvalContext, MetricResult

# which inputs of a weight-bearing node are its learned parameters (when they are float
# initializers). BatchNormalization's running mean and variance are statistics, not weights: they
# stay (a random variance could be negative).
WEIGHT_INPUTS: dict[str, tuple[int, ...]] = {
    "Conv": (1, 2),
    "ConvTranspose": (1, 2),
    "Gemm": (0, 1, 2),
    "MatMul": (0, 1),
    "BatchNormalization": (1, 2),
    "InstanceNormalization": (1, 2),
    "LayerNormalization": (1, 2),
    "GroupNormalization": (1, 2),
    "PRelu": (1,),
    # int8 operators (onnxruntime's QOperator and dynamic forms): their quantised weights and int32 biases
    "QLinearConv": (3, 8),
    "QLinearMatMul": (0, 3),
    "QGemm": (0, 3, 6),
    "ConvInteger": (1,),
    "MatMulInteger": (0, 1),
}
FLOAT = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
INTEGER = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32)


@dataclass(frozen=True)
class Block:
    """Weight-bearing nodes under one name scope, and the initializers randomised with them."""

    name: str
    nodes: tuple[str, ...]
    initializers: tuple[str, ...]


def rankdata(a: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given the mean of the ranks they span (scipy's 'average')."""
    a = np.asarray(a, np.float64).ravel()
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    mean_rank = (starts + ends + 1) / 2.0  # ranks starts+1 .. ends, averaged
    ranks = np.empty(len(a))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation: Pearson's of the tie-averaged ranks; NaN when either is constant."""
    ra, rb = rankdata(a), rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _scope(name: str, depth: int) -> str:
    parts = [p for p in name.split("/") if p]
    if depth <= 0 or len(parts) <= 1:
        return name
    scope = parts[:-1]  # the last part names the op itself (torch: /layer4/layer4.1/conv2/Conv)
    return "/" + "/".join(scope[:depth])


def weight_blocks(model: onnx.ModelProto, depth: int = 2) -> list[Block]:
    """The weight-bearing nodes of `model` (WEIGHT_INPUTS with stored parameters: see `stored`), grouped
    by the first `depth` parts of their name scope (0: each node its own block), ordered from the
    output backwards (by each block's last node in the graph's topological order). An initializer
    shared by several blocks goes with the block nearest the output."""
    tensors = _stored_tensors(model)
    producers = {o: n for n in model.graph.node for o in n.output}

    def stored(name: str) -> str | None:
        """The stored tensor holding a parameter: itself (an initializer or a Constant's value), or
        the int8 tensor a DequantizeLinear reads (QDQ models); None for a computed input."""
        if name in tensors:
            return name
        node = producers.get(name)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[0] in tensors:
            return node.input[0] if tensors[node.input[0]].data_type in INTEGER else None
        return None

    found: dict[str, tuple[list[str], list[str], int]] = {}
    taken: set[str] = set()
    for index in range(len(model.graph.node) - 1, -1, -1):
        node = model.graph.node[index]
        if node.op_type not in WEIGHT_INPUTS:
            continue
        params = [
            held
            for k in WEIGHT_INPUTS[node.op_type]
            if k < len(node.input) and node.input[k] and (held := stored(node.input[k])) is not None
        ]
        if not params:
            continue
        name = node.name or f"{node.op_type}_{index}"
        key = _scope(name, depth)
        nodes, names, _ = found.setdefault(key, ([], [], len(found)))
        nodes.append(name)
        names.extend(p for p in params if p not in taken and p not in names)
        taken.update(params)
    blocks = sorted(found.items(), key=lambda kv: kv[1][2])
    return [Block(k, tuple(reversed(v[0])), tuple(v[1])) for k, v in blocks if v[1]]


def _stored_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """The graph's stored float and integer tensors by name: initializers and Constant nodes' values."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return {k: t for k, t in found.items() if t.data_type in FLOAT + INTEGER}


def _random_like(w: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian values with w's own mean and std; for integer (quantised) w rounded and kept within
    w's own range, so the quantiser's range (e.g. 7-bit weights) still holds."""
    values = rng.normal(float(w.mean()), float(w.std()), size=w.shape)
    if np.issubdtype(w.dtype, np.integer):
        return np.clip(np.rint(values), int(w.min()), int(w.max())).astype(w.dtype)
    return values.astype(w.dtype)


def randomised(model: onnx.ModelProto, names: set[str], rng: np.random.Generator) -> onnx.ModelProto:
    """A copy of `model` whose stored tensors `names` (initializers, Constant values; int8 ones too)
    hold Gaussian values with each tensor's own mean and standard deviation (a constant tensor, e.g.
    a zero bias, stays as it is); the graph untouched. Drawn in the graph's initializer order, then
    its Constant nodes'."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for k, t in enumerate(out.graph.initializer):
        if t.name in names:
            out.graph.initializer[k].CopyFrom(
                numpy_helper.from_array(_random_like(numpy_helper.to_array(t), rng), t.name)
            )
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output[0] in names and node.attribute[0].name == "value":
            t = node.attribute[0].t
            t.CopyFrom(numpy_helper.from_array(_random_like(numpy_helper.to_array(t), rng), t.name))
    return out


def source_model(explainer: Explainer) -> onnx.ModelProto:
    """The un-prepared model inside the Explainer's prepared one: its original outputs only, the
    gradient and CAM nodes pruned (surgery/forward.py), prepare's metadata dropped."""
    proto = explainer.model
    names = [o.name for o in proto.graph.output]
    # prepare appends the gradcam_* outputs after the original ones, and the Explainer the logits
    # after those (where they were no output): the original outputs are those before the first gradcam_*
    first = next((i for i, name in enumerate(names) if name.startswith("gradcam_")), len(names))
    outputs = names[:first] or [explainer.reduction]
    src = forward_model(proto, outputs)
    keep = [p for p in src.metadata_props if not p.key.startswith(META_PREFIX)]
    del src.metadata_props[:]
    src.metadata_props.extend(keep)
    return src


def _prepare_like(explainer: Explainer, source: onnx.ModelProto, method: str, verify: bool) -> Explainer:
    """Prepare `source` with the Explainer's feature layers, reduction and method; an Explainer on it."""
    meta = explainer.metadata
    features = json.loads(meta.get("feature_tensors", json.dumps([meta["feature_tensor"]])))
    pre = explainer.preprocess
    proto, report = prepare_model(
        source,
        feature_layer=features,
        reduction_layer=meta["reduction_tensor"],
        preprocess=Preprocess(pre.mean, pre.std, pre.bgr),
        methods=(method,),
    )
    if verify:
        verify_prepared(source, proto, report)
    return Explainer(
        proto,
        device=explainer.device,
        preprocess=pre,
        batch_size=explainer.batch_size,
        threads=explainer.threads,
        size=explainer.size,
        layout=explainer.input.layout,
    )


def _model_input(explainer: Explainer, x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if explainer.input.layout == "nhwc" else x


def cascading_randomisation(
    explainer: Explainer,
    ctx: EvalContext,
    method: str | None = None,
    seed: int = 0,
    depth: int = 2,
    max_blocks: int | None = None,
    verify: bool = True,
) -> list[MetricResult]:
    """Cascading randomisation (Adebayo et al., "Sanity checks for saliency maps", NeurIPS 2018).

    The weights of the source model (the prepared model's forward part) are replaced block by block,
    from the logits downward and cumulatively, by seeded Gaussian values of each tensor's own mean
    and std; after each step the model is prepared again with the same feature layers, reduction
    tensor and method, and explains the same classes (those explained on the clean model). For each
    image and step: Spearman's rank correlation between the original map and the randomised one
    (curves["spearman"] [N, B]); a method that depends on the weights falls towards 0.
    curves["spearman_none"] [N]: the model prepared again with nothing randomised (1 when the
    pipeline reproduces the original maps). `verify`: prepare's self-check on each rebuilt model.
    """
    if explainer.metadata.get("target", "class") != "class":
        raise BadInputError(
            "the sanity check explains classes, and this model was prepared with --target seed: to fix this, "
            "prepare it with --target class"
        )
    method = explainer.checked_method(method)
    x = _model_input(explainer, ctx.x)
    targets = [int(c) for c in ctx.classes]
    original = explainer.explain(x, target=targets, method=method).maps
    source = source_model(explainer)
    blocks = weight_blocks(source, depth)
    if not blocks:
        raise BadInputError(
            "the model has no weight-bearing node (Conv, Gemm, MatMul, BatchNormalization, their int8 forms...) "
            "with stored weights to randomise: the sanity check cannot run on it"
        )
    if max_blocks is not None:
        blocks = blocks[: max(1, int(max_blocks))]

    def correlations(maps: np.ndarray) -> np.ndarray:
        return np.array([spearman(a, b) for a, b in zip(original, maps)])

    same = correlations(_prepare_like(explainer, source, method, verify).explain(x, targets, method).maps)
    rng = np.random.default_rng(seed)
    names: set[str] = set()
    current = source
    columns = []
    for block in blocks:
        current = randomised(current, set(block.initializers) - names, rng)
        names.update(block.initializers)
        columns.append(correlations(_prepare_like(explainer, current, method, verify).explain(x, targets, method).maps))
    rho = np.stack(columns, axis=1)
    mean = np.array([np.nanmean(c) if np.isfinite(c).any() else np.nan for c in rho.T])
    per_image = np.array([np.nanmean(r) if np.isfinite(r).any() else np.nan for r in rho])
    return [
        MetricResult(
            "sanity_cascading",
            float(np.nanmean(mean)) if np.isfinite(mean).any() else float("nan"),
            per_image,
            {
                "reference": "Adebayo et al. 2018, Sanity checks for saliency maps (cascading randomisation)",
                "method": method,
                "blocks": [b.name for b in blocks],
                "block_nodes": {b.name: list(b.nodes) for b in blocks},
                "block_initializers": {b.name: list(b.initializers) for b in blocks},
                "grouping": f"weight-bearing nodes ({', '.join(WEIGHT_INPUTS)}) with stored parameters "
                "(initializers or Constant values, float or int8, or int8 ones behind DequantizeLinear), grouped "
                f"by the first {depth} parts of their name scope, from the output backwards",
                "randomisation": "cumulative from the logits down; each stored parameter replaced by Gaussian values "
                "with its own mean and std (int8: rounded, within its own range; scales and zero points kept; "
                "constant tensors stay), BatchNormalization's running mean/var kept, "
                f"numpy default_rng({seed}) drawn in block order; the graph untouched",
                "model": "the prepared model's forward part, prepared again after each step (same feature "
                f"layers, reduction tensor and method), prepare's self-check {'on' if verify else 'off'}",
                "classes": "those explained on the clean model (its top-1)",
                "correlation": "Spearman (Pearson of tie-averaged ranks) over all pixels of the maps at input "
                "size, as returned (non-negative, normalised per image); NaN when a map is constant (e.g. all zero "
                "after the ReLU), left out of the means",
                "constant_maps": int(np.isnan(rho).sum()),
                "constant_maps_per_block": np.isnan(rho).sum(axis=0).tolist(),
                "value": "mean over steps of the mean over images of the correlation",
                "mean_per_block": mean.tolist(),
            },
            {"spearman": rho, "spearman_none": same, "mean": mean},
        )
    ]

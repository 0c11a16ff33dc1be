"""Reverse-mode differentiation over the nodes between a source tensor and a target tensor.

The seed (dL/dtarget) and the ReLU rule are parameters; contributions from several consumers
of one tensor are summed. Nodes that only compute shapes or indices carry no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import onnx

from ..errors import OnnxGradCamError
from .context import RuleContext
from .registry import RULES, differentiable_inputs


def forward_reachable(nodes: Sequence[onnx.NodeProto], sources: Iterable[str]) -> set[str]:
    """Tensors that depend differentiably on any source (sources included)."""
    reached = set(sources)
    for node in nodes:  # nodes are topologically sorted in a valid graph
        idx = differentiable_inputs(node)
        if any(node.input[i] in reached for i in idx if i < len(node.input)):
            outs = node.output[:1] if node.op_type in ("MaxPool", "TopK", "Dropout") else node.output
            reached.update(o for o in outs if o)
    return reached


def backward_reachable(nodes: Sequence[onnx.NodeProto], targets: Iterable[str]) -> set[str]:
    """Tensors some target depends on differentiably (targets included)."""
    reached = set(targets)
    for node in reversed(nodes):
        if any(o in reached for o in node.output if o):
            reached.update(node.input[i] for i in differentiable_inputs(node) if i < len(node.input))
    reached.discard("")
    return reached


def path_nodes(
    nodes: Sequence[onnx.NodeProto], source: str, targets: Iterable[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes on differentiable paths source -> targets, and the tensors on those paths."""
    fwd = forward_reachable(nodes, [source])
    bwd = backward_reachable(nodes, targets)
    on_path = fwd & bwd
    chosen = [n for n in nodes if any(o in on_path for o in n.output) and any(i in on_path for i in n.input)]
    return chosen, on_path


def backprop(
    ctx: RuleContext,
    nodes: Sequence[onnx.NodeProto],
    source: str,
    seeds: Mapping[str, str],
) -> str:
    """Emit nodes computing d(Σ_t <seed_t, t>)/d(source) for targets t; returns the gradient's name.

    `seeds` maps each target tensor to the tensor holding dL/dtarget (for Grad-CAM: the
    one-hot of the explained class at the logits).
    """
    chosen, on_path = path_nodes(nodes, source, seeds)
    missing = [t for t in seeds if t not in on_path]
    if source not in on_path or missing:
        raise OnnxGradCamError(
            f"the score tensor {(missing or list(seeds))[0]!r} does not depend differentiably on the feature "
            f"tensor {source!r}: to fix this, choose a feature layer that lies before the score"
        )
    grads: dict[str, list[str]] = {t: [s] for t, s in seeds.items()}
    for node in reversed(chosen):
        dys = [_total(ctx, grads.get(o)) if o else None for o in node.output]
        if all(d is None for d in dys):
            continue
        rule = RULES.get(node.op_type)
        if rule is None or node.domain not in ("", "ai.onnx"):
            raise ctx.unsupported(node)
        wrt = [bool(i) and i in on_path for i in node.input]
        dxs = rule(ctx, node, dys, wrt)
        for name, want, dx in zip(node.input, wrt, dxs, strict=False):
            if want and dx is not None:
                grads.setdefault(name, []).append(dx)
    total = _total(ctx, grads.get(source))
    if total is None:
        raise OnnxGradCamError(f"no gradient reached the feature tensor {source!r}")
    return total


def _total(ctx: RuleContext, parts: list[str] | None) -> str | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return ctx.b.op("Sum", parts, hint="grad_sum")

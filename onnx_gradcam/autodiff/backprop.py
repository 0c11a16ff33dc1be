"""Reverse-mode differentiation over the nodes between a source tensor and a target tensor.

The seed (dL/dtarget) and the ReLU rule are parameters; contributions from several consumers
of one tensor are summed. Nodes that only compute shapes or indices carry no gradient.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import onnx

from ..errors import OnnxGradCamError
from .context import RuleContext
from .registry import differentiable_inputs, rule_for


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
    nodes: Sequence[onnx.NodeProto], sources: Iterable[str], targets: Iterable[str]
) -> tuple[list[onnx.NodeProto], set[str]]:
    """The nodes on differentiable paths sources -> targets, and the tensors on those paths."""
    fwd = forward_reachable(nodes, sources)
    bwd = backward_reachable(nodes, targets)
    on_path = fwd & bwd
    chosen = [n for n in nodes if any(o in on_path for o in n.output) and any(i in on_path for i in n.input)]
    return chosen, on_path


def backprop(
    ctx: RuleContext,
    nodes: Sequence[onnx.NodeProto],
    sources: str | Sequence[str],
    seeds: Mapping[str, str],
) -> Any:
    """Emit nodes computing d(Σ_t <seed_t, t>)/d(source) for targets t and each source.

    `seeds` maps each target tensor to the tensor holding dL/dtarget (for Grad-CAM: the
    one-hot of the explained class at the logits). One backward pass serves all sources.
    Returns the gradient's name, or a list of names when `sources` is a list.
    """
    names = [sources] if isinstance(sources, str) else list(sources)
    chosen, on_path = path_nodes(nodes, names, seeds)
    for source in names:
        missing = [t for t in seeds if t not in forward_reachable(nodes, [source])]
        if missing:
            raise OnnxGradCamError(
                f"the score tensor {missing[0]!r} does not depend differentiably on the tensor "
                f"{source!r}: to fix this, choose a feature layer that lies before the score"
            )
    grads: dict[str, list[str]] = {t: [s] for t, s in seeds.items()}
    for node in reversed(chosen):
        dys = [_total(ctx, grads.get(o)) if o else None for o in node.output]
        if all(d is None for d in dys):
            continue
        rule = rule_for(node)
        if rule is None:
            raise ctx.unsupported(node)
        wrt = [bool(i) and i in on_path for i in node.input]
        dxs = rule(ctx, node, dys, wrt)
        for name, want, dx in zip(node.input, wrt, dxs, strict=False):
            if want and dx is not None:
                grads.setdefault(name, []).append(dx)
    totals = []
    for source in names:
        total = _total(ctx, grads.get(source))
        if total is None:
            raise OnnxGradCamError(f"no gradient reached the tensor {source!r}")
        totals.append(total)
    return totals[0] if isinstance(sources, str) else totals


def _total(ctx: RuleContext, parts: list[str] | None) -> str | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return ctx.b.op("Sum", parts, hint="grad_sum")

"""The forward part of a prepared model: its original outputs only, the gradient part pruned away.

Perturbation metrics run the model on hundreds of altered inputs and need only its scores.
"""

from __future__ import annotations

import onnx


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (Loop, If, Scan bodies) read from the enclosing graph."""
    used: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for inner in g.node:
                local.update(inner.output)
            for inner in g.node:
                used.update(n for n in [*inner.input, *_subgraph_inputs(inner)] if n and n not in local)
    return used


def forward_model(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """A copy of `model` that computes only `outputs` (graph outputs or intermediate tensors):
    nodes, initializers and inputs nothing of them needs are dropped; IR version and opsets kept."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    needed: set[str] = set(outputs)
    keep: set[int] = set()
    stack = list(outputs)
    index = {id(node): i for i, node in enumerate(graph.node)}
    while stack:
        node = producer.get(stack.pop())
        if node is None or index[id(node)] in keep:
            continue
        keep.add(index[id(node)])
        for name in [*node.input, *_subgraph_inputs(node)]:
            if name and name not in needed:
                needed.add(name)
                stack.append(name)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = [n for i, n in enumerate(graph.node) if i in keep]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in graph.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    init_names = {t.name for t in inits}
    inputs = [i for i in graph.input if i.name in needed]
    del g.input[:]
    g.input.extend(inputs)
    known = {vi.name: vi for vi in [*graph.output, *graph.value_info]}
    del g.output[:]
    for name in outputs:
        g.output.append(
            known[name] if name in known else onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
        )
    values = [vi for vi in graph.value_info if vi.name in needed and vi.name not in init_names]
    del g.value_info[:]
    g.value_info.extend(values)
    return out

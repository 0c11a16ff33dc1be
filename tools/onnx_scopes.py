"""Which torch module call an ONNX tensor of a torch export is the output of, and back.

TorchScript exports (dynamo=False) name each node by its module scope: '/blocks/blocks.11/norm1/
LayerNormalization' lies in module 'blocks.11.norm1'; a numbered child's scope is '<parent scope>.
<index>', a module called a second time gets '_1' ('relu_1': the second call of 'relu'). Dynamo
exports record the scopes in each node's metadata ('pkg.torch.onnx.name_scopes'). A module's output
is the output of the last node in its scope. Tests check a mapping by value (`ModuleCall.hook`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

import onnx

SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(frozen=True)
class ModuleCall:
    """The `call`-th call (0 = the first) of submodule `path` of a torch model."""

    path: str
    call: int = 0

    def __str__(self) -> str:
        return self.path if self.call == 0 else f"{self.path} (call {self.call + 1})"

    def hook(self, net, fn):  # type: ignore[no-untyped-def]
        """Register fn(output) -> replacement | None as a forward hook on that call only."""
        calls = [0]

        def on_call(_m, _i, out):  # type: ignore[no-untyped-def]
            n = calls[0]
            calls[0] += 1
            return fn(out) if n == self.call else None

        return net.get_submodule(self.path).register_forward_hook(on_call)


def _node_scopes(node: onnx.NodeProto) -> list[str] | None:
    """The module scopes of a node, outermost first, as TorchScript writes them (no root)."""
    for p in node.metadata_props:
        if p.key == SCOPES_KEY:
            scopes = ast.literal_eval(p.value)
            return [s for s in scopes[:-1] if s]  # the last one is the fx node
    if node.name.startswith("/"):
        return node.name.split("/")[1:-1]
    return None


def _resolve(net, scopes: list[str]) -> list[ModuleCall]:  # type: ignore[no-untyped-def]
    """The module call of each scope prefix (dynamo scopes are full paths already)."""
    out: list[ModuleCall] = []
    path, prev = "", ""
    for comp in scopes:
        if comp.startswith(path + ".") or (path == "" and _has(net, comp)):  # dynamo: the full path
            full, call = comp, 0
        elif prev and comp.startswith(prev + "."):  # numbered child: '<parent scope>.<index>'
            full, call = f"{path}.{comp[len(prev) + 1 :]}", 0
        else:
            full, call = (f"{path}.{comp}" if path else comp), 0
        if not _has(net, full):
            m = re.fullmatch(r"(.+)_(\d+)", full)
            if m and _has(net, m.group(1)):
                full, call = m.group(1), int(m.group(2))
        out.append(ModuleCall(full, call))
        path, prev = full, comp
    return out


def _has(net, path: str) -> bool:  # type: ignore[no-untyped-def]
    try:
        net.get_submodule(path)
        return True
    except AttributeError:
        return False


def module_calls(model: onnx.ModelProto, tensor: str, net) -> list[ModuleCall]:  # type: ignore[no-untyped-def]
    """The module calls whose output `tensor` is (the last node of their scope), deepest first.

    A shallower one can be the right one: the TorchScript exporter folds BatchNorm into the Conv
    before it, so that Conv's output (scope 'conv') is the enclosing ConvNormAct's output."""
    nodes = list(model.graph.node)
    at = next((i for i, n in enumerate(nodes) if tensor in n.output), None)
    if at is None:
        return []
    scopes = _node_scopes(nodes[at])
    if not scopes:
        return []
    calls = _resolve(net, scopes)
    found = []
    for depth in range(len(scopes), 0, -1):
        inside = [n for n in nodes if (_node_scopes(n) or [])[:depth] == scopes[:depth]]
        if inside and tensor in inside[-1].output and _has(net, calls[depth - 1].path):
            found.append(calls[depth - 1])
    return found


def module_of(model: onnx.ModelProto, tensor: str, net) -> ModuleCall | None:  # type: ignore[no-untyped-def]
    """The deepest module call whose output `tensor` is, else None."""
    calls = module_calls(model, tensor, net)
    return calls[0] if calls else None


def tensor_of(model: onnx.ModelProto, module: str) -> str:
    """The output of torch module `module` (its first call) in an export: its scope's last node."""
    nodes = list(model.graph.node)
    dynamo = any(p.key == SCOPES_KEY for n in nodes[:50] for p in n.metadata_props)
    if dynamo:
        inside = [n for n in nodes if module in (_node_scopes(n) or [])]
    else:
        scopes: list[str] = []
        for part in module.split("."):
            scopes.append(f"{scopes[-1]}.{part}" if part.isdigit() and scopes else part)
        prefix = "/" + "/".join(scopes) + "/"
        inside = [n for n in nodes if n.name.startswith(prefix)]
    if not inside:
        raise KeyError(f"no node of module {module!r} in the export")
    return inside[-1].output[0]

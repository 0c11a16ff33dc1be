"""The package's one error hierarchy.

Every message says what went wrong, where (node, op, opset, file) and how to fix it.
"""

from __future__ import annotations


class OnnxGradCamError(Exception):
    """Base class of every error this package raises on purpose."""


class UnsupportedOpError(OnnxGradCamError):
    """An op between the feature tensor and the score has no gradient rule (or attribute)."""

    def __init__(self, op_type: str, node_name: str, opset: int, detail: str = "") -> None:
        self.op_type = op_type
        self.node_name = node_name
        self.opset = opset
        self.detail = detail
        self.alternatives: list[str] = []
        self.scores: list[str] = []
        super().__init__(self._message())

    def with_alternatives(self, names: list[str], scores: list[str] | None = None) -> UnsupportedOpError:
        """Name feature layers after the node (`names`) and tensors before it that could be the score."""
        self.alternatives = list(names)
        self.scores = list(scores or [])
        self.args = (self._message(),)
        return self

    def _message(self) -> str:
        what = f"no gradient rule for op {self.op_type!r} (node {self.node_name!r}, opset {self.opset})"
        if self.detail:
            where = f"op {self.op_type!r} (node {self.node_name!r}, opset {self.opset})"
            what = f"the gradient rule for {where} cannot handle {self.detail}"
        fix = "choose a feature layer nearer the output with --feature-layer"
        if self.alternatives:
            fix += ", e.g. " + ", ".join(repr(n) for n in self.alternatives[:5])
        if self.scores:
            shown = ", ".join(repr(n) for n in self.scores[:3])
            fix += f", or explain a tensor before it with --target seed --reduction-layer, e.g. {shown}"
        return f"{what}; to fix this, {fix}"


class LayerNotFoundError(OnnxGradCamError):
    """A named tensor or node does not exist, or cannot serve as feature/reduction tensor."""


class BadInputError(OnnxGradCamError):
    """A file, image, array or option given by the caller cannot be used."""


class ProviderUnavailableError(OnnxGradCamError):
    """An execution provider (CUDA, ...) was asked for but cannot be loaded."""


class VerificationError(OnnxGradCamError):
    """A prepared model failed its self-check (it did not load or run in onnxruntime, changed an
    original output, or broke the contract of a gradcam_* output); nothing was written.

    `node` and `op_type` name the failing node where one is known ("" otherwise).
    """

    def __init__(self, message: str, node: str = "", op_type: str = "") -> None:
        self.node = node
        self.op_type = op_type
        super().__init__(message)

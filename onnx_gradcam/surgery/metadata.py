"""What a prepared model records about itself (its gradcam.* metadata) and how its images are
preprocessed: light enough for running a prepared model without loading the gradient engine."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx

META_PREFIX = "gradcam."
# how a class-target model takes its class (--class-input): "optional", an input backed by an
# initializer [-1] (callers may leave it out); "required", a plain input every request sends (-1 =
# top-1), for servers that batch (Triton's onnxruntime backend refuses optional inputs when
# max_batch_size > 0, OpenVINO folds an initializer-backed input into a constant); "none", top-1 only
CLASS_INPUTS = ("optional", "required", "none")


@dataclass(frozen=True)
class Preprocess:
    """How images become the model's input: pixels/255, minus mean, over std, RGB or BGR."""

    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    bgr: bool = False

    def to_json(self) -> str:
        return json.dumps({"mean": list(self.mean), "std": list(self.std), "bgr": self.bgr})

    @classmethod
    def from_json(cls, text: str) -> Preprocess:
        d = json.loads(text)
        return cls(tuple(d["mean"]), tuple(d["std"]), bool(d.get("bgr", False)))


PRESETS: dict[str, Preprocess] = {
    "imagenet": Preprocess(),
    "unit": Preprocess((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "symmetric": Preprocess((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "none": Preprocess((0.0, 0.0, 0.0), (1.0 / 255, 1.0 / 255, 1.0 / 255)),
}


def read_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The gradcam.* metadata of a prepared model (empty for a plain one)."""
    return {p.key[len(META_PREFIX) :]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}

"""From images to the model's input tensor: size, layout, channel order, normalisation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import BadInputError
from ..surgery.metadata import Preprocess

RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


_NUMPY_TYPES: dict[str, type[np.generic]] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(uint16)": np.uint16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
}
_INTEGER_TYPES = {k for k, v in _NUMPY_TYPES.items() if np.dtype(v).kind in "iu"}


@dataclass(frozen=True)
class InputSpec:
    """The image input of a model: name, layout, channel count and static spatial size (if any)."""

    name: str
    layout: str  # "nchw", "nhwc", "nct" (a signal [N, C, T]) or "nt" (ids [N, T])
    channels: int
    size: tuple[int, int] | None  # (height, width), None where dynamic
    dtype: str = "tensor(float)"

    @property
    def is_signal(self) -> bool:
        return self.layout == "nct"

    @property
    def is_tokens(self) -> bool:
        """Integer ids [N, T]: tokens or bytes."""
        return self.layout == "nt"

    @property
    def numpy_dtype(self) -> type[np.generic]:
        """The element type the model reads (float32 where onnxruntime names no other)."""
        return _NUMPY_TYPES.get(self.dtype, np.float32)

    @classmethod
    def from_shape(
        cls, name: str, shape: Sequence[object], layout: str | None, dtype: str = "tensor(float)"
    ) -> InputSpec:
        if len(shape) == 2 and dtype in _INTEGER_TYPES:  # [N, T] ids: tokens or bytes
            t = shape[1]
            return cls(name, "nt", 1, (1, t) if isinstance(t, int) and t > 0 else None, dtype)
        if len(shape) == 3:  # [N, channels, length]: a 1-D signal
            c, t = shape[1], shape[2]
            return cls(name, "nct", c if isinstance(c, int) else 1, (1, t) if isinstance(t, int) else None, dtype)
        if len(shape) != 4:
            raise BadInputError(
                f"input {name!r} has shape {list(shape)}: `explain` takes images (rank 4), signals (rank 3) or "
                "integer ids (rank 2: tokens, bytes); to fix this, run the prepared model yourself (see the README)"
            )
        if layout is None or layout == "nct":
            layout = "nhwc" if shape[3] in (1, 3, 4) and shape[1] not in (1, 3, 4) else "nchw"
        c = shape[1] if layout == "nchw" else shape[3]
        if isinstance(c, int) and c not in (1, 3):
            shown = "[" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + "]"
            raise BadInputError(
                f"input {name!r} has shape {shown}, which read as {layout} has {c} channels, but images give "
                "1 (grey) or 3 (RGB): to fix this, give the other --layout (nchw or nhwc)"
            )
        h, w = (shape[2], shape[3]) if layout == "nchw" else (shape[1], shape[2])
        size = (h, w) if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0 else None
        return cls(name, layout, c if isinstance(c, int) else 3, size, dtype)


def to_tensor(
    images: Sequence[Image.Image],
    spec: InputSpec,
    preprocess: Preprocess,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """A float32 batch in the model's layout: resized (bilinear), then (x / 255 - mean) / std.

    Colour images are normalised as one multiply-add per channel, x * (1 / (255 std)) - mean / std,
    straight from uint8 into the batch (1.6 against 2.9 ms a 500x375 image with the three float
    passes it replaces, BENCHMARKS.md); the two forms differ by float32 rounding (about 1e-7 of the value).
    """
    hw = size or spec.size
    if hw is None:
        raise BadInputError(
            f"the model's input {spec.name!r} has no fixed height and width: to fix this, give --size HxW"
        )
    h, w = hw
    mean = np.asarray(preprocess.mean, np.float64)
    std = np.asarray(preprocess.std, np.float64)
    grey = spec.channels == 1
    out = np.empty((len(images), 1 if grey else 3, h, w), np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    offset = (-mean / std).astype(np.float32)
    for i, img in enumerate(images):
        rgb = img if img.mode == "RGB" else img.convert("RGB")  # convert() to its own mode copies
        arr = np.asarray(rgb.resize((w, h), Image.Resampling.BILINEAR))
        if grey:
            out[i, 0] = (arr.mean(axis=2, dtype=np.float32) / 255.0 - mean.mean()) / std.mean()
            continue
        for c in range(3):
            src = arr[:, :, 2 - c if preprocess.bgr else c]
            np.multiply(src, scale[c], out=out[i, c], dtype=np.float32)
            out[i, c] += offset[c]
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1)) if spec.layout == "nhwc" else out


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'224' or '224x320' (height x width) -> (h, w)."""
    if text is None:
        return None
    parts = text.lower().replace(",", "x").split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 or v > 16384 for v in values):
        raise BadInputError(f"--size {text!r} is not a size: to fix this, write e.g. 224 or 224x320 (height x width)")
    return (values[0], values[-1])

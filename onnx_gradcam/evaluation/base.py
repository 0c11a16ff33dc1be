"""What every evaluation metric shares: the images in pixel and model space, the model's scores
on perturbed inputs (batched, forward part only), and the result each metric returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import BadInputError
from ..explain.explainer import Explainer
from ..explain.session import create_session, run_session
from ..surgery.forward import forward_model


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 (scores of perturbed inputs are compared to 1e-4)."""
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class Scorer:
    """The model's logits for any number of inputs, run in batches on a session over the forward
    part of the prepared model (its gradient and CAM nodes pruned: a perturbed input needs no map).

    Inputs are NCHW float32 in the model's normalised space; NHWC models get them transposed.

    Example:
        >>> scorer = Scorer(explainer, batch_size=32)
        >>> p = scorer.probabilities(x)          # [N, K] float64
    """

    def __init__(self, explainer: Explainer, batch_size: int = 32) -> None:
        self.explainer = explainer
        self.batch_size = batch_size
        self.input_name = explainer.input.name
        self.nhwc = explainer.input.layout == "nhwc"
        forward = forward_model(explainer.model, [explainer.reduction])
        # spin=False: between runs the intra-op threads sleep, leaving the cores to the metrics' own
        # threads (ROAD's solves) instead of busy-waiting for the next batch
        self.session, _ = create_session(forward.SerializeToString(), explainer.device, explainer.threads, spin=False)
        self.runs = 0  # onnxruntime runs so far: the tests check that nothing runs one image at a time

    def logits(self, x: np.ndarray) -> np.ndarray:
        """[N, K] float32 logits of NCHW inputs x."""
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.nhwc else x, dtype=self.explainer.input.numpy_dtype)
        parts = []
        for start in range(0, len(x), self.batch_size):
            parts.append(run_session(self.session, {self.input_name: x[start : start + self.batch_size]})[0])
            self.runs += 1
        return np.concatenate(parts).astype(np.float32).reshape(len(x), -1)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """[N, K] float64 softmax of the logits."""
        return softmax(self.logits(x))


@dataclass(frozen=True)
class EvalContext:
    """One set of images as every metric sees it.

    pixels: [N, 3, H, W] float32 in [0, 1] at the model's input size (after resizing, before
    normalisation); x: [N, C, H, W] the model's normalised input (x = (pixels - mean) / std);
    classes: [N] the class predicted on the clean image (the class explained); logits: [N, K] on
    the clean image; boxes: per image a list of boxes [x0, y0, x1, y1] in input pixels (empty
    where none are known); truth: [N] the true classes (-1 where unknown); names: the images' names.
    """

    pixels: np.ndarray
    x: np.ndarray
    classes: np.ndarray
    logits: np.ndarray
    mean: np.ndarray  # [C, 1, 1]
    std: np.ndarray  # [C, 1, 1]
    bgr: bool
    scorer: Scorer
    names: list[str] = field(default_factory=list)
    boxes: list[list[list[float]]] = field(default_factory=list)
    truth: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def normalise(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels [N, 3, H, W] in [0, 1] -> the model's normalised input (as explain.preprocess does)."""
        p = pixels[:, ::-1] if self.bgr else pixels
        if self.x.shape[1] == 1:
            p = p.mean(axis=1, keepdims=True)
            return ((p - self.mean.mean()) / self.std.mean()).astype(np.float32)
        return ((p - self.mean) / self.std).astype(np.float32)


@dataclass(frozen=True)
class MetricResult:
    """One metric over a set of images.

    value: the aggregate the metric's reference reports (mean AUC, % of images, ...);
    per_image: [N] the value for each image (NaN where undefined, e.g. no box);
    settings: every choice made (score, baseline, space, step, tie-breaking, AUC rule, reference);
    curves: named arrays, e.g. "deletion" [N, P] scores after each step, with "x" [P] the fraction
    of pixels changed.
    """

    name: str
    value: float
    per_image: np.ndarray
    settings: dict[str, object]
    curves: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "value": float(self.value),
            "per_image": [None if np.isnan(v) else float(v) for v in np.asarray(self.per_image, np.float64)],
            "settings": self.settings,
            "curves": {k: np.asarray(v).tolist() for k, v in self.curves.items()},
        }


def make_context(
    explainer: Explainer,
    images: list[Image.Image],
    names: list[str] | None = None,
    boxes: list[list[list[float]]] | None = None,
    truth: list[int] | None = None,
    batch_size: int = 32,
) -> EvalContext:
    """The context for images (PIL), with boxes [x0, y0, x1, y1] in each image's own pixels
    (scaled here to the model's input size); the clean image's top-1 class is the one explained."""
    spec = explainer.input
    if spec.size is None and explainer.size is None:
        raise BadInputError("the model's input has no fixed size: to fix this, give the Explainer a size")
    h, w = explainer.size or spec.size  # type: ignore[misc]
    pre = explainer.preprocess
    pixels = np.stack(
        [np.asarray(img.convert("RGB").resize((w, h), Image.Resampling.BILINEAR), np.float32) / 255.0 for img in images]
    ).transpose(0, 3, 1, 2)
    mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
    if boxes is not None and len(boxes) != len(images):
        raise BadInputError(
            f"{len(boxes)} box lists for {len(images)} images: to fix this, give one list (maybe empty) per image"
        )
    scaled: list[list[list[float]]] = []
    for i, (img, own) in enumerate(zip(images, boxes if boxes is not None else [[] for _ in images])):
        sx, sy = w / img.width, h / img.height
        scaled.append([[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in _checked_boxes(own, i)])
    scorer = Scorer(explainer, batch_size)
    ctx = EvalContext(pixels, pixels, np.zeros(0, np.int64), np.zeros((0, 0), np.float32), mean, std, pre.bgr, scorer)
    x = ctx.normalise(pixels)
    logits = scorer.logits(x)
    return EvalContext(
        pixels=pixels,
        x=x,
        classes=logits.argmax(axis=1).astype(np.int64),
        logits=logits,
        mean=mean,
        std=std,
        bgr=pre.bgr,
        scorer=scorer,
        names=list(names) if names is not None else [f"image{i}" for i in range(len(images))],
        boxes=scaled,
        truth=np.asarray(truth if truth is not None else [-1] * len(images), np.int64),
    )


def _checked_boxes(own: object, i: int) -> list[list[float]]:
    """An image's boxes as lists of 4 floats [x0, y0, x1, y1]; a one-line error for anything else
    (a bare box instead of a list of boxes, a box of 3 numbers, a string)."""
    fix = "to fix this, give each image a list of boxes [[x0, y0, x1, y1], ...] in its own pixels"
    if not isinstance(own, (list, tuple, np.ndarray)):
        raise BadInputError(f"the boxes of image {i} are {own!r}, not a list of boxes: {fix}")
    out = []
    for b in own:
        if isinstance(b, (str, bytes)) or not hasattr(b, "__len__") or len(b) != 4:
            raise BadInputError(f"box {b!r} of image {i} is not 4 numbers: {fix}")
        try:
            out.append([float(v) for v in b])
        except (TypeError, ValueError):
            raise BadInputError(f"box {b!r} of image {i} is not 4 numbers: {fix}") from None
    return out

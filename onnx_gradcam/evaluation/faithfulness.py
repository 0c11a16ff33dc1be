"""Faithfulness of maps by perturbing the input: deletion/insertion AUC (RISE), Average Drop and
Increase in Confidence (Grad-CAM++) and pytorch-grad-cam's absolute confidence-change metrics."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from ..errors import BadInputError
from .base import EvalContext, MetricResult, softmax

SCORES = ("probability", "logit")


def check_maps(ctx: EvalContext, maps: np.ndarray) -> np.ndarray:
    """maps as float32 [N, H, W] matching the context's images, or a one-line BadInputError."""
    m = np.asarray(maps)
    want = (len(ctx.x), *ctx.x.shape[2:])
    if m.shape != want:
        raise BadInputError(
            f"maps have shape {list(m.shape)}, the images need {list(want)}: to fix this, pass one map per image at "
            "the model's input size (Explainer(...).explain(...).maps)"
        )
    if not np.issubdtype(m.dtype, np.number) or not np.all(np.isfinite(m)):
        raise BadInputError("maps hold non-finite values: to fix this, pass finite float maps")
    return m.astype(np.float32)


def check_score(score: str) -> str:
    if score not in SCORES:
        raise BadInputError(f"unknown score {score!r}: to fix this, use one of {', '.join(SCORES)}")
    return score


def class_scores(logits: np.ndarray, classes: np.ndarray, score: str) -> np.ndarray:
    """[M] float64 score of classes[i] in logits[i]: its softmax probability or its logit."""
    z = softmax(logits) if score == "probability" else np.asarray(logits, np.float64)
    return z[np.arange(len(z)), classes]


def scores_of(ctx: EvalContext, batches: Iterator[tuple[np.ndarray, np.ndarray]], score: str) -> np.ndarray:
    """Scores of the clean top-1 class for a stream of (image indices [M], inputs [M, C, H, W]);
    inputs are gathered into runs of at least the scorer's batch size (never one image per run)."""
    out: list[np.ndarray] = []
    idx: list[np.ndarray] = []
    xs: list[np.ndarray] = []
    pending = 0

    def flush() -> None:
        nonlocal pending
        if xs:
            i = np.concatenate(idx)
            out.append(class_scores(ctx.scorer.logits(np.concatenate(xs)), ctx.classes[i], score))
            idx.clear()
            xs.clear()
            pending = 0

    for i, x in batches:
        idx.append(np.asarray(i))
        xs.append(x)
        pending += len(x)
        if pending >= ctx.scorer.batch_size:
            flush()
    flush()
    return np.concatenate(out) if out else np.zeros(0)


def clean_scores(ctx: EvalContext, score: str) -> np.ndarray:
    return class_scores(ctx.logits, ctx.classes, score)


# --- deletion / insertion (Petsiuk et al., RISE, BMVC 2018; their evaluation.py's CausalMetric) ---


def rise_step(h: int, w: int) -> int:
    """RISE's step, 224*8 pixels on 224x224 (28 steps), scaled to other sizes as ceil(H*W / 28)."""
    return math.ceil(h * w / 28)


def rise_kernel(klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's gkern 1-D factor: scipy.ndimage.gaussian_filter(delta, sigma) of a klen-long delta,
    i.e. a Gaussian truncated at 4 sigma with scipy's 'reflect' boundary folded back into the
    klen taps (the 2-D kernel is outer(k, k); it sums to 1)."""
    radius = int(4.0 * sigma + 0.5)
    t = np.arange(-radius, radius + 1)
    g = np.exp(-0.5 * (t / sigma) ** 2)
    g /= g.sum()
    k = np.zeros(klen)
    centre = klen // 2
    for j, wt in zip(t, g):  # tap at centre + j, folded by half-sample reflection (period 2*klen)
        p = (centre + j) % (2 * klen)
        k[p if p < klen else 2 * klen - 1 - p] += wt
    return k


def rise_blur(x: np.ndarray, klen: int = 11, sigma: float = 5.0) -> np.ndarray:
    """RISE's insertion substrate: conv2d(x, gkern(klen, sigma), padding=klen//2), per channel, zero
    padding, in the space x is in (RISE's images are normalised tensors)."""
    k = rise_kernel(klen, sigma)
    r = klen // 2
    h, w = x.shape[-2:]
    p = np.pad(np.asarray(x, np.float64), ((0, 0), (0, 0), (r, r), (r, r)))
    rows = sum(k[i] * p[:, :, i : i + h, :] for i in range(klen))
    return sum(k[i] * rows[:, :, :, i : i + w] for i in range(klen)).astype(np.float32)  # type: ignore[union-attr]


def salient_rank(maps: np.ndarray) -> np.ndarray:
    """[N, H*W] each pixel's place in the order highest map value first; ties keep raster order
    (a stable sort of -map: RISE's np.flip(np.argsort(...)) leaves their order to the sort)."""
    flat = maps.reshape(len(maps), -1)
    order = np.argsort(-flat, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(flat.shape[1])[None].repeat(len(flat), 0), axis=1)
    return rank


def rise_auc(curves: np.ndarray) -> np.ndarray:
    """RISE's auc() per row: (sum - first/2 - last/2) / (n - 1)."""
    return (curves.sum(axis=1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


def _causal_curves(
    ctx: EvalContext, rank: np.ndarray, start: np.ndarray, finish: np.ndarray, step: int, score: str
) -> np.ndarray:
    n, c, h, w = start.shape
    hw = h * w
    n_steps = math.ceil(hw / step)
    pairs = [(i, s) for i in range(n) for s in range(n_steps + 1)]
    chunk = max(ctx.scorer.batch_size, 1)

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for at in range(0, len(pairs), chunk):
            img = np.array([p[0] for p in pairs[at : at + chunk]])
            done = np.array([p[1] for p in pairs[at : at + chunk]]) * step
            changed = (rank[img] < done[:, None]).reshape(-1, 1, h, w)
            yield img, np.where(changed, finish[img], start[img])

    return scores_of(ctx, batches(), score).reshape(n, n_steps + 1)


def deletion_insertion(
    ctx: EvalContext,
    maps: np.ndarray,
    step: int | None = None,
    score: str = "probability",
    blur_size: int = 11,
    blur_sigma: float = 5.0,
) -> list[MetricResult]:
    """Deletion and insertion AUC as RISE's CausalMetric (Petsiuk et al., BMVC 2018).

    Pixels are changed in order of the map, highest first, `step` at a time (default 224*8 on
    224x224, i.e. ceil(H*W/28)), n_steps = ceil(H*W/step), n_steps + 1 scores per image.
    Deletion: from the image to 0 in normalised space; insertion: from the image blurred (kernel
    blur_size, sigma blur_sigma, zero padding, in normalised space) to the image. Score: softmax
    probability (or logit) of the class predicted on the clean image. AUC = RISE's auc().

    Example:
        >>> dele, ins = deletion_insertion(ctx, maps)
        >>> dele.value, ins.curves["insertion"].shape      # mean AUC, [N, 29]
    """
    m = check_maps(ctx, maps)
    check_score(score)
    h, w = m.shape[1:]
    step = rise_step(h, w) if step is None else int(step)
    if step < 1 or step > h * w:
        raise BadInputError(f"step {step} is not in 1..{h * w} (pixels per step): to fix this, give one in that range")
    if blur_size < 1 or blur_size % 2 == 0 or blur_sigma <= 0:
        raise BadInputError(
            f"blur kernel {blur_size} / sigma {blur_sigma}: to fix this, give an odd size >= 1 and a positive sigma"
        )
    rank = salient_rank(m)
    n_steps = math.ceil(h * w / step)
    x_axis = np.minimum(np.arange(n_steps + 1) * step, h * w) / (h * w)
    common = {
        "score": score,
        "class": "top-1 on the clean image",
        "order": "map value, highest first; ties in raster order (stable sort)",
        "step": step,
        "step_rule": "224*8 pixels on 224x224, scaled as ceil(H*W/28)" if step == rise_step(h, w) else "given",
        "n_steps": n_steps,
        "points": n_steps + 1,
        "auc": "(sum - first/2 - last/2) / (points - 1), RISE's auc(); value = mean over images",
        "reference": "Petsiuk et al., RISE, BMVC 2018, evaluation.py CausalMetric",
    }
    zeros = np.zeros_like(ctx.x)
    blurred = rise_blur(ctx.x, blur_size, blur_sigma)
    results = []
    for name, start, finish, substrate in (
        ("deletion", ctx.x, zeros, "0 in normalised space"),
        (
            "insertion",
            blurred,
            ctx.x,
            f"Gaussian blur (kernel {blur_size}, sigma {blur_sigma}, zero padding) of the normalised image",
        ),
    ):
        curves = _causal_curves(ctx, rank, start, finish, step, score)
        per = rise_auc(curves)
        settings = {**common, "substrate": substrate, "space": "normalised"}
        results.append(MetricResult(name, float(per.mean()), per, settings, {name: curves, "x": x_axis}))
    return results


# --- Average Drop / Increase in Confidence (Chattopadhyay et al., Grad-CAM++, WACV 2018) ---


def explanation_inputs(ctx: EvalContext, m: np.ndarray, space: str) -> np.ndarray:
    if space == "pixels":
        return ctx.normalise(ctx.pixels * m[:, None])
    if space == "normalised":
        return (ctx.x * m[:, None]).astype(np.float32)
    raise BadInputError(f"unknown space {space!r}: to fix this, use 'pixels' or 'normalised'")


def _one_batch(ctx: EvalContext, x: np.ndarray, score: str) -> np.ndarray:
    return scores_of(ctx, iter([(np.arange(len(x)), x)]), score)


def average_drop_increase(
    ctx: EvalContext, maps: np.ndarray, space: str = "pixels", score: str = "probability"
) -> list[MetricResult]:
    """Average Drop and Increase in Confidence (Grad-CAM++, §5.1).

    E = map * image, the image in [0, 1] pixels (then normalised for the model; space="normalised"
    multiplies the normalised input instead, as pytorch-grad-cam does). Y = score of the clean
    top-1 class on the image, O = on E. AD = mean of max(0, Y - O) / Y * 100; IC = % of images with O > Y.
    """
    m = check_maps(ctx, maps)
    check_score(score)
    y = clean_scores(ctx, score)
    o = _one_batch(ctx, explanation_inputs(ctx, m, space), score)
    drop = np.maximum(0.0, y - o) / y * 100.0
    inc = (o > y).astype(np.float64) * 100.0
    settings = {
        "score": score,
        "class": "top-1 on the clean image",
        "explanation": "E = map * image"
        + (" in [0, 1] pixels, then normalised" if space == "pixels" else " (normalised)"),
        "space": space,
        "reference": "Chattopadhyay et al., Grad-CAM++, WACV 2018, section 5.1",
    }
    return [
        MetricResult(
            "average_drop", float(drop.mean()), drop, {**settings, "formula": "mean of max(0, Y - O) / Y * 100"}
        ),
        MetricResult(
            "increase_in_confidence", float(inc.mean()), inc, {**settings, "formula": "% of images with O > Y"}
        ),
    ]


# --- pytorch-grad-cam 1.5.7's CamMultImageConfidenceChange, DropInConfidence, IncreaseInConfidence ---


def confidence_change(ctx: EvalContext, maps: np.ndarray, score: str = "probability") -> list[MetricResult]:
    """pytorch-grad-cam's absolute confidence changes: d = score(x * map) - score(x), x the normalised
    input. CamMultImageConfidenceChange = d, DropInConfidence = max(0, -d), IncreaseInConfidence =
    1 if d > 0 else 0; value = mean over images (its units: score, score, fraction of images)."""
    m = check_maps(ctx, maps)
    check_score(score)
    d = _one_batch(ctx, explanation_inputs(ctx, m, "normalised"), score) - clean_scores(ctx, score)
    settings = {
        "score": score
        + (" (ClassifierOutputSoftmaxTarget)" if score == "probability" else " (ClassifierOutputTarget)"),
        "class": "top-1 on the clean image",
        "explanation": "x * map, x the normalised input",
        "space": "normalised",
        "relative": False,
        "reference": "pytorch-grad-cam 1.5.7 metrics/cam_mult_image.py",
    }
    return [
        MetricResult("cam_mult_image_confidence_change", float(d.mean()), d, {**settings, "formula": "O - Y"}),
        MetricResult(
            "drop_in_confidence",
            float(np.maximum(0, -d).mean()),
            np.maximum(0, -d),
            {**settings, "formula": "max(0, Y - O)"},
        ),
        MetricResult(
            "increase_in_confidence_pgc",
            float((d > 0).mean()),
            (d > 0).astype(np.float64),
            {**settings, "formula": "1 if O > Y else 0 (a fraction, not %)"},
        ),
    ]

"""Localisation metrics of maps against known boxes: the pointing game (as TorchRay), its
energy-based variant (Score-CAM) and the Grad-CAM paper's box protocol (top-1 localisation error)."""

from __future__ import annotations

import math

import numpy as np

from ..errors import BadInputError
from .base import EvalContext, MetricResult

POINTING_TOLERANCE = 15  # pixels (Zhang et al.; TorchRay's PointingGame default)
CAM_THRESHOLD = 0.15  # fraction of the map's maximum (Grad-CAM §4.1)
IOU_CORRECT = 0.5

# how a box [x0, y0, x1, y1] (continuous coordinates, pixel (r, c) covering [c, c+1) x [r, r+1))
# becomes pixels: those whose centre lies inside it. An integer box [x0, y0, x1, y1] is then the
# pixels x0..x1-1, y0..y1-1, which is TorchRay's VOC mask of the 1-based inclusive box
# [x0+1, y0+1, x1, y1] (mask[ymin-1 : ymax, xmin-1 : xmax] = 1).
BOX_PIXELS = "pixels whose centre (c + 0.5, r + 0.5) lies in [x0, x1] x [y0, y1]"


# -- inputs -----------------------------------------------------------------------------------


def checked_maps(ctx: EvalContext, maps: np.ndarray) -> np.ndarray:
    """maps as float64 [N, H, W] at the context's input size, finite (a copy: inputs stay as given)."""
    m = np.asarray(maps)
    n, h, w = len(ctx.pixels), ctx.pixels.shape[2], ctx.pixels.shape[3]
    if m.shape != (n, h, w):
        raise BadInputError(
            f"maps have shape {list(m.shape)} but the images are {n} x {h} x {w}: to fix this, pass the "
            "Explainer's maps [N, H, W] at the input size, one per image"
        )
    if m.dtype.kind not in "fiu" or not np.all(np.isfinite(m)):
        raise BadInputError("maps hold NaN, infinite or non-numeric values: to fix this, pass finite float maps")
    return m.astype(np.float64)


def checked_boxes(ctx: EvalContext, metric: str) -> list[np.ndarray]:
    """Per image an array [B, 4] of boxes [x0, y0, x1, y1] in input pixels, clipped to the image;
    an error when a box is malformed or no image has one."""
    n, h, w = len(ctx.pixels), ctx.pixels.shape[2], ctx.pixels.shape[3]
    if len(ctx.boxes) != n:
        raise BadInputError(
            f"{metric} needs the objects' boxes, but {len(ctx.boxes)} box lists were given for {n} images: "
            "to fix this, pass --boxes FILE with a list (maybe empty) per image"
        )
    out = []
    for name, boxes in zip(ctx.names or [f"image{i}" for i in range(n)], ctx.boxes):
        try:
            arr = np.asarray(boxes, np.float64).reshape(-1, 4) if len(boxes) else np.zeros((0, 4))
        except (TypeError, ValueError):
            raise BadInputError(
                f"the boxes of {name!r} are not lists of 4 numbers [x0, y0, x1, y1]: to fix this, give each "
                "box as [x0, y0, x1, y1] in the image's pixels"
            ) from None
        if len(boxes) and (any(np.ndim(b) != 1 or len(b) != 4 for b in boxes)):
            raise BadInputError(
                f"a box of {name!r} does not have 4 numbers: to fix this, give each box as [x0, y0, x1, y1]"
            )
        if not np.all(np.isfinite(arr)):
            raise BadInputError(f"a box of {name!r} holds NaN or infinity: to fix this, give finite coordinates")
        bad = (arr[:, 2] <= arr[:, 0]) | (arr[:, 3] <= arr[:, 1])
        if bad.any():
            b = arr[np.argmax(bad)].tolist()
            raise BadInputError(
                f"box {b} of {name!r} is empty or reversed (x1 <= x0 or y1 <= y0): to fix this, give boxes as "
                "[x0, y0, x1, y1] with x0 < x1 and y0 < y1 (left, top, right, bottom)"
            )
        clipped = np.stack([arr[:, 0].clip(0, w), arr[:, 1].clip(0, h), arr[:, 2].clip(0, w), arr[:, 3].clip(0, h)], 1)
        outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
        if outside.any():
            b = arr[np.argmax(outside)].tolist()
            raise BadInputError(
                f"box {b} of {name!r} lies outside the image: to fix this, give boxes in the image's own pixels"
            )
        out.append(clipped)
    if not any(len(b) for b in out):
        raise BadInputError(f"{metric} needs the objects' boxes and none were given: to fix this, pass --boxes FILE")
    return out


def box_mask(boxes: np.ndarray, h: int, w: int) -> np.ndarray:
    """[H, W] bool: the union of the boxes' pixels (BOX_PIXELS); a box narrower than a pixel keeps the
    pixel holding its centre, so no box is lost."""
    mask = np.zeros((h, w), bool)
    cols, rows = np.arange(w) + 0.5, np.arange(h) + 0.5
    for x0, y0, x1, y1 in boxes:
        inside_c = (cols >= x0) & (cols <= x1)
        inside_r = (rows >= y0) & (rows <= y1)
        if not inside_c.any():
            inside_c[min(int((x0 + x1) / 2), w - 1)] = True
        if not inside_r.any():
            inside_r[min(int((y0 + y1) / 2), h - 1)] = True
        mask |= inside_r[:, None] & inside_c[None, :]
    return mask


def regions(ctx: EvalContext, metric: str, masks: np.ndarray | None) -> list[np.ndarray | None]:
    """Per image the object's pixels [H, W] bool (None: no object known, skipped): the given masks
    (segmentations, [N, H, W] at input size) or else the union of the image's boxes."""
    n, h, w = len(ctx.pixels), ctx.pixels.shape[2], ctx.pixels.shape[3]
    if masks is None:
        return [box_mask(b, h, w) if len(b) else None for b in checked_boxes(ctx, metric)]
    arr = np.asarray(masks)
    if arr.shape != (n, h, w) or arr.dtype.kind not in "biuf":
        raise BadInputError(
            f"masks have shape {list(arr.shape)} ({arr.dtype}) but the images are {n} x {h} x {w}: to fix this, "
            "pass boolean object masks [N, H, W] at the input size"
        )
    out: list[np.ndarray | None] = [a.astype(bool) if a.any() else None for a in arr]
    if all(o is None for o in out):
        raise BadInputError(f"{metric} got masks without any object pixel: to fix this, pass the objects' masks")
    return out


def groups(ctx: EvalContext) -> np.ndarray:
    """The class each image counts for in per-class means: its true class where known, else the class explained."""
    truth = np.asarray(ctx.truth, np.int64)
    if truth.shape != (len(ctx.pixels),):
        return np.asarray(ctx.classes, np.int64)
    return np.where(truth >= 0, truth, ctx.classes)


# -- pointing game ----------------------------------------------------------------------------


def max_point(m: np.ndarray) -> tuple[int, int]:
    """(u, v) = (column, row) of the map's maximum; ties: the first in row-major order (np.argmax on
    the flattened map, as TorchRay's torch.argmax on saliency.view(n, -1))."""
    k = int(np.argmax(m))
    return k % m.shape[1], k // m.shape[1]


def pointing_game(
    ctx: EvalContext, maps: np.ndarray, tolerance: float = POINTING_TOLERANCE, masks: np.ndarray | None = None
) -> list[MetricResult]:
    """Pointing game (Zhang et al., ECCV 2016, "Top-down neural attention by excitation backprop"),
    by TorchRay's rule: a hit when a box pixel lies strictly within `tolerance` px of the map's
    maximum, (r - v)^2 + (c - u)^2 < tolerance^2; the value is the mean over classes of the per-class
    hit rate (hits / (hits + misses)), the overall hit rate in the settings. Images without boxes
    are skipped (NaN), as TorchRay skips a class it has no box of. `masks` [N, H, W] (object
    segmentations at input size, as TorchRay's COCO masks) replace the boxes where given."""
    m = checked_maps(ctx, maps)
    objects = regions(ctx, "the pointing game", masks)
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance > 0):
        raise BadInputError(
            f"pointing tolerance {tolerance!r} is not a positive number of pixels: to fix this, give 15"
        )
    n, h, w = m.shape
    hits = np.full(n, np.nan)
    rows, cols = np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64)
    flat = 0
    for i, obj in enumerate(objects):
        if obj is None:
            continue
        u, v = max_point(m[i])
        flat += int(m[i].max() == m[i].min())
        accept = (rows[:, None] - v) ** 2 + (cols[None, :] - u) ** 2 < float(tolerance) ** 2
        hits[i] = float((obj & accept).any())
    cls = groups(ctx)
    per_class = {int(c): float(np.nanmean(hits[(cls == c) & ~np.isnan(hits)])) for c in np.unique(cls[~np.isnan(hits)])}
    value = float(np.mean(list(per_class.values())))
    return [
        MetricResult(
            "pointing_game",
            value,
            hits,
            {
                "reference": "Zhang et al. 2016 (excitation backprop); TorchRay torchray/benchmark/pointing_game.py",
                "point": "the map's maximum; ties: the first in row-major order (argmax of the flattened map)",
                "hit": f"a box pixel (r, c) with (r - v)^2 + (c - u)^2 < {tolerance}^2 (strict, as TorchRay)",
                "tolerance_px": float(tolerance),
                "resolution": f"model input, {h}x{w}: maps and boxes (scaled to it) at input size, tolerance in "
                "input pixels, not rescaled (TorchRay resizes the saliency to the original image and counts "
                "its 15 px there)",
                "object": "the masks given" if masks is not None else BOX_PIXELS + "; several boxes: their union",
                "value": "mean over classes of hits / (hits + misses), classes that have images with boxes "
                "(TorchRay averages over all the dataset's classes, which VOC and COCO all have)",
                "classes": "true class where known, else the class explained (top-1 on the clean image)",
                "per_class": per_class,
                "hit_rate": float(np.nanmean(hits)),
                "images_scored": int((~np.isnan(hits)).sum()),
                "flat_maps": flat,
                "unit": "fraction",
            },
        )
    ]


def energy_pointing_game(ctx: EvalContext, maps: np.ndarray, masks: np.ndarray | None = None) -> list[MetricResult]:
    """Energy-based pointing game (Wang et al., Score-CAM, CVPR-W 2020): the share of the map's mass
    inside the box(es), Σ_box L / Σ L, per image; the value is its mean over images with boxes. A map
    with no mass (all zero) has no share (NaN, left out of the mean). `masks` [N, H, W] replace the
    boxes where given."""
    m = checked_maps(ctx, maps)
    objects = regions(ctx, "the energy-based pointing game", masks)
    if (m < 0).any():
        raise BadInputError(
            "the energy-based pointing game takes non-negative maps (a share of mass): to fix this, pass the "
            "Explainer's maps (in [0, 1]) or clip them at 0"
        )
    n, h, w = m.shape
    share = np.full(n, np.nan)
    empty = 0
    for i, obj in enumerate(objects):
        if obj is None:
            continue
        total = m[i].sum()
        if total <= 0:
            empty += 1
            continue
        share[i] = m[i][obj].sum() / total
    value = float(np.nanmean(share)) if np.isfinite(share).any() else float("nan")
    return [
        MetricResult(
            "energy_pointing_game",
            value,
            share,
            {
                "reference": "Wang et al. 2020, Score-CAM, section 4.2 (energy-based pointing game)",
                "share": "sum of the map inside the union of the boxes / sum of the whole map",
                "map": f"as given (the Explainer's: normalised to [0, 1] per image), at input size {h}x{w}",
                "object": "the masks given" if masks is not None else BOX_PIXELS + "; several boxes: their union",
                "value": "mean over images with boxes and a map of positive mass",
                "maps_without_mass": empty,
                "unit": "fraction",
            },
        )
    ]


# -- the Grad-CAM paper's localisation ----------------------------------------------------------


def connected_components(mask: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Labels [N, H, W] int64 of the connected segments of a bool mask [N, H, W] (-1 off the mask).

    A segment's label is the flat index (over N*H*W) of its first pixel in row-major order. Found by
    min-label propagation over the neighbours (8: the 3x3 square; 4: the cross) with pointer jumping,
    vectorised in numpy, until nothing changes: then neighbours on the mask share a label, and labels
    come from their own segment, so each segment has one label of its own.
    """
    if connectivity not in (4, 8):
        raise BadInputError(f"connectivity {connectivity!r}: to fix this, give 4 or 8")
    mask = np.asarray(mask, bool)
    n, h, w = mask.shape
    big = n * h * w
    lab = np.where(mask, np.arange(big, dtype=np.int64).reshape(n, h, w), big)
    shifts = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]
    if connectivity == 4:
        shifts = [s for s in shifts if 0 in s]
    while True:
        padded = np.pad(lab, ((0, 0), (1, 1), (1, 1)), constant_values=big)
        new = lab.copy()
        for dr, dc in shifts:
            np.minimum(new, padded[:, 1 + dr : 1 + dr + h, 1 + dc : 1 + dc + w], out=new)
        new = np.where(mask, new, big)
        flat = new.reshape(-1)
        on = flat < big
        while True:  # pointer jumping: a label's own label, until stable
            jumped = flat.copy()
            jumped[on] = flat[flat[on]]
            if np.array_equal(jumped, flat):
                break
            flat = jumped
        new = flat.reshape(n, h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(mask, lab, -1)


def largest_segment_box(m: np.ndarray, threshold: float = CAM_THRESHOLD, connectivity: int = 8) -> np.ndarray:
    """[N, 4] boxes [x0, y0, x1, y1] (continuous: pixels c0..c1 give x0 = c0, x1 = c1 + 1) around the
    largest connected segment of each map's pixels above threshold * its maximum (strictly above, as
    cv2.THRESH_BINARY in CAM's and Grad-CAM's code). Ties of size: the segment whose first pixel comes
    first in row-major order. A map with no pixel above (all zero): NaN box."""
    n, h, w = m.shape
    peak = m.reshape(n, -1).max(axis=1)
    mask = (m > threshold * peak[:, None, None]) & (peak[:, None, None] > 0)
    labels = connected_components(mask, connectivity)
    out = np.full((n, 4), np.nan)
    for i in range(n):
        li = labels[i][labels[i] >= 0]
        if not li.size:
            continue
        values, counts = np.unique(li, return_counts=True)  # sorted: ties go to the smallest label
        keep = values[np.argmax(counts)]
        r, c = np.nonzero(labels[i] == keep)
        out[i] = [c.min(), r.min(), c.max() + 1, r.max() + 1]
    return out


def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one box [4] with boxes [B, 4], as areas of continuous rectangles."""
    ix = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0, None)
    iy = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0, None)
    inter = ix * iy
    area = (box[2] - box[0]) * (box[3] - box[1]) + (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area - inter)


def localisation(
    ctx: EvalContext, maps: np.ndarray, threshold: float = CAM_THRESHOLD, connectivity: int = 8
) -> list[MetricResult]:
    """The Grad-CAM paper's weakly-supervised localisation (Selvaraju et al., §4.1, after CAM's ILSVRC
    protocol): binarise each map at `threshold` x its maximum, box the largest connected segment;
    the top-1 localisation error counts an image wrong when its top-1 class is not the true class or
    the box's IoU with every true box is below 0.5. The classification error is recorded with it.
    Needs the true classes (ctx.truth) of the images with boxes."""
    m = checked_maps(ctx, maps)
    boxes = checked_boxes(ctx, "localisation")
    if not (isinstance(threshold, (int, float)) and 0 <= threshold < 1):
        raise BadInputError(
            f"threshold {threshold!r}: to fix this, give a fraction of the maximum in [0, 1), e.g. 0.15"
        )
    n = len(m)
    truth = np.asarray(ctx.truth, np.int64)
    scored = np.array([len(b) > 0 for b in boxes])
    if truth.shape != (n,) or (truth[scored] < 0).any():
        raise BadInputError(
            "the localisation error needs each image's true class (a wrong class counts as an error): to fix "
            'this, give the class with each box (the boxes file\'s "class" field, or truth=[...])'
        )
    pred = largest_segment_box(m, threshold, connectivity)
    best = np.full(n, np.nan)
    for i in np.nonzero(scored)[0]:
        best[i] = 0.0 if np.isnan(pred[i]).any() else float(iou(pred[i], boxes[i]).max())
    correct_class = (np.asarray(ctx.classes) == truth).astype(np.float64)
    error = np.where(scored, 1.0 - ((best >= IOU_CORRECT) & (correct_class == 1)), np.nan)
    class_error = float(1.0 - correct_class[scored].mean())
    box_error = float(np.mean(best[scored] < IOU_CORRECT))
    return [
        MetricResult(
            "localisation_error",
            float(np.nanmean(error)),
            error,
            {
                "reference": "Selvaraju et al., Grad-CAM (ICCV 2017 / IJCV 2020) section 4.1; CAM (Zhou et al. 2016)",
                "threshold": f"pixels strictly above {threshold} x the map's maximum (cv2.THRESH_BINARY)",
                "segment": f"the largest {connectivity}-connected segment (pixel count); ties: first in row-major "
                "order; a map with no pixel above the threshold has no box (IoU 0)",
                "connectivity": connectivity,
                "box": "the segment's bounding box, continuous coordinates (pixels c0..c1 -> x0 = c0, x1 = c1 + 1)",
                "correct": f"top-1 class = true class and IoU >= {IOU_CORRECT} with some true box",
                "iou": "areas of continuous rectangles, true boxes clipped to the image",
                "classification_error": class_error,
                "box_error": box_error,
                "images_scored": int(scored.sum()),
                "resolution": f"model input, {m.shape[1]}x{m.shape[2]}",
                "unit": "fraction",
            },
            {"iou": best, "correct_class": correct_class, "box": pred},
        )
    ]

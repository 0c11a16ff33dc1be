"""Seeds for models prepared with target="seed": dL/d(reduction tensor) for common scores L.

The prepared model takes `gradcam_seed`, shaped like its reduction tensor (batch first), and
explains L = Σ seed ⊙ reduction per sample. Pure NumPy; every helper returns float32 [N, ...].

`reduction_shape` is the reduction tensor's shape with its batch axis first. The batch entry
may be a size N (N identical rows), or symbolic, as onnxruntime reports a dynamic axis (None,
a name such as "batch", or -1): then one row. `batch=` overrides it. Shapes without any batch
entry are not accepted: [21, 8, 8] could be [N, C, T] as well as [C, H, W].
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import BadInputError

Dim = int | str | None


def _full_shape(reduction_shape: Sequence[Dim], batch: int | None, min_rank: int, what: str) -> tuple[int, ...]:
    """(N, *sizes) from a shape whose first entry is the batch, given or symbolic."""
    shape = list(reduction_shape)
    if len(shape) < min_rank:
        raise BadInputError(
            f"{what} needs the reduction tensor's shape with its batch axis first and rank >= {min_rank}, "
            f"got {shape}: to fix this, pass the shape of the session's 'gradcam_seed' input "
            "(as session.get_inputs() lists it)"
        )
    rest = shape[1:]
    if not all(isinstance(d, (int, np.integer)) and d > 0 for d in rest):
        raise BadInputError(
            f"the reduction shape {shape} has sizes unknown before running (symbolic after the batch axis): "
            "to fix this, give the sizes of the reduction tensor for your input (e.g. the output's shape)"
        )
    first = shape[0]
    if batch is None:
        batch = int(first) if isinstance(first, (int, np.integer)) and first > 0 else 1
    if batch < 1:
        raise BadInputError(f"batch={batch}: to fix this, give a batch size >= 1")
    return (int(batch), *(int(d) for d in rest))  # type: ignore[arg-type]


def _per_sample(value: int | Sequence[int], n: int, what: str) -> list[int]:
    """One int per sample: an int for all, or a sequence of length n."""
    if isinstance(value, (int, np.integer)):
        return [int(value)] * n
    values = [int(v) for v in value]
    if len(values) != n:
        raise BadInputError(f"{len(values)} values of {what} for a batch of {n}: to fix this, give one or {n}")
    return values


def _check_range(value: int, size: int, what: str) -> None:
    if not 0 <= value < size:
        raise BadInputError(f"{what} {value} is out of range: to fix this, give 0 <= {what} < {size}")


def _nearest(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour resize with pixel centres: out[i] = in[floor((i + 0.5) * n_in / n_out)]."""
    for axis, n_out in enumerate(size):
        n_in = mask.shape[axis]
        if n_in != n_out:
            index = np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)
            mask = np.take(mask, index, axis=axis)
    return mask


def class_seed(reduction_shape: Sequence[Dim], cls: int | Sequence[int], *, batch: int | None = None) -> np.ndarray:
    """One-hot at class `cls` on axis 1, at every position: L = Σ_positions y[cls].

    For [N, K] logits this is the usual one-hot; for a dense output [N, K, H, W] the class's
    logits summed over the whole map. `cls` is one class or one per sample.

    Example:
        >>> class_seed([2, 3], [0, 2])
        array([[1., 0., 0.],
               [0., 0., 1.]], dtype=float32)
        >>> float(class_seed(["batch", 4, 2, 2], 1).sum())
        4.0
    """
    full = _full_shape(reduction_shape, batch, 2, "class_seed")
    seed = np.zeros(full, np.float32)
    for i, c in enumerate(_per_sample(cls, full[0], "cls")):
        _check_range(c, full[1], "class")
        seed[i, c] = 1.0
    return seed


def region_seed(
    reduction_shape: Sequence[Dim],
    cls: int | Sequence[int],
    mask: np.ndarray | Sequence[int],
    *,
    batch: int | None = None,
) -> np.ndarray:
    """Segmentation: L = Σ over a region of class `cls`'s logits (Vinogradova et al., AAAI 2020).

    seed[n, cls, p] = mask[p], 0 for the other classes. The reduction is [N, K, *spatial]. `mask`
    is boolean, shaped like the spatial axes ([H, W]; [T] for 1-D, [D, H, W] for volumes) or
    with a batch axis in front (one mask per sample), resized by nearest neighbour to the
    output's spatial size where it differs; or, for 2-D outputs, a box (x0, y0, x1, y1) in the
    output's pixels, x1 and y1 exclusive.

    Example:
        >>> region_seed([1, 2, 3, 4], 1, (1, 0, 3, 2))[0, 1]
        array([[0., 1., 1., 0.],
               [0., 1., 1., 0.],
               [0., 0., 0., 0.]], dtype=float32)
        >>> m = np.zeros((6, 8), bool); m[:4, :4] = True  # at twice the output's resolution
        >>> region_seed([1, 2, 3, 4], 0, m)[0, 0]
        array([[1., 1., 0., 0.],
               [1., 1., 0., 0.],
               [0., 0., 0., 0.]], dtype=float32)
    """
    full = _full_shape(reduction_shape, batch, 3, "region_seed")
    n, spatial = full[0], full[2:]
    if isinstance(mask, np.ndarray) and mask.ndim in (len(spatial), len(spatial) + 1):
        m = mask.astype(bool)
        per_sample = m.ndim == len(spatial) + 1
        if per_sample and m.shape[0] != n:
            raise BadInputError(f"{m.shape[0]} masks for a batch of {n}: to fix this, give one mask or {n}")
        m = _nearest(m, ((m.shape[0],) if per_sample else ()) + spatial)
        if not per_sample:
            m = np.broadcast_to(m, (n, *spatial))
    elif not isinstance(mask, np.ndarray) and len(spatial) == 2 and len(mask) == 4:
        h, w = spatial
        x0, y0, x1, y1 = (int(v) for v in mask)
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise BadInputError(
                f"region {x0},{y0},{x1},{y1} is not inside the {w}x{h} output: to fix this, "
                "give x0,y0,x1,y1 with 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height"
            )
        m = np.zeros((n, h, w), bool)
        m[:, y0:y1, x0:x1] = True
    else:
        shape = mask.shape if isinstance(mask, np.ndarray) else f"a sequence of {len(mask)}"
        raise BadInputError(
            f"mask {shape} does not fit an output with spatial size {list(spatial)}: to fix this, give a "
            f"boolean array of rank {len(spatial)} (or {len(spatial) + 1} with a batch axis)"
            + (" or a box (x0, y0, x1, y1)" if len(spatial) == 2 else "")
        )
    if not m.reshape(n, -1).any(axis=1).all():
        raise BadInputError(
            f"the region is empty at the output's resolution {list(spatial)} for some sample: "
            "to fix this, give a larger region (masks are resized by nearest neighbour)"
        )
    seed = np.zeros(full, np.float32)
    for i, c in enumerate(_per_sample(cls, n, "cls")):
        _check_range(c, full[1], "class")
        seed[i, c] = m[i]
    return seed


def box_seed(
    reduction_shape: Sequence[Dim],
    index: int | Sequence[int],
    cls: int | Sequence[int],
    *,
    box_axis: int = 1,
    class_offset: int = 5,
    batch: int | None = None,
) -> np.ndarray:
    """Detection, before NMS: L = the class `cls` score of box (cell, anchor) `index`.

    Assumes a rank-3 head: one axis lists the boxes, the other each box's attributes, class
    scores starting at `class_offset`. The defaults fit YOLOv3/v5-style [N, boxes, 4 + 1 +
    classes] (x, y, w, h, objectness, classes...); YOLOv8-style [N, 4 + classes, boxes] is
    `box_axis=2, class_offset=4`. For other layouts use `output_seed` with a tuple index.

    Example:
        >>> box_seed([1, 3, 7], index=2, cls=1)[0]
        array([[0., 0., 0., 0., 0., 0., 0.],
               [0., 0., 0., 0., 0., 0., 0.],
               [0., 0., 0., 0., 0., 0., 1.]], dtype=float32)
        >>> np.argwhere(box_seed([1, 6, 100], index=42, cls=0, box_axis=2, class_offset=4))
        array([[ 0,  4, 42]])
    """
    full = _full_shape(reduction_shape, batch, 3, "box_seed")
    if len(full) != 3 or box_axis % 3 == 0:
        raise BadInputError(
            f"box_seed expects a head [N, boxes, attributes] or [N, attributes, boxes], got {list(full)} with "
            f"box_axis={box_axis}: to fix this, use output_seed(shape, (i, j, ...)) for other layouts"
        )
    box_axis = box_axis % 3
    attr_axis = 3 - box_axis
    seed = np.zeros(full, np.float32)
    n = full[0]
    for i, (b, c) in enumerate(zip(_per_sample(index, n, "index"), _per_sample(cls, n, "cls"))):
        _check_range(b, full[box_axis], "box index")
        _check_range(c, full[attr_axis] - class_offset, "class")
        where = [i, 0, 0]
        where[box_axis], where[attr_axis] = b, class_offset + c
        seed[tuple(where)] = 1.0
    return seed


def output_seed(reduction_shape: Sequence[Dim], index: int | Sequence[int], *, batch: int | None = None) -> np.ndarray:
    """Regression (or any single output): L = y[index], a one-hot at `index`.

    `index` is an int for [N, D] outputs, a tuple over the non-batch axes for higher ranks.

    Example:
        >>> output_seed([2, 3], 1)
        array([[0., 1., 0.],
               [0., 1., 0.]], dtype=float32)
        >>> np.argwhere(output_seed([None, 2, 4, 4], (1, 2, 3)))
        array([[0, 1, 2, 3]])
    """
    full = _full_shape(reduction_shape, batch, 2, "output_seed")
    idx = (int(index),) if isinstance(index, (int, np.integer)) else tuple(int(i) for i in index)
    if len(idx) != len(full) - 1 or not all(0 <= i < d for i, d in zip(idx, full[1:])):
        raise BadInputError(
            f"output index {index} does not fit outputs shaped {list(full[1:])}: to fix this, give "
            f"{len(full) - 1} non-negative indices, each below its axis' size"
        )
    seed = np.zeros(full, np.float32)
    where: tuple[slice | int, ...] = (slice(None),) + idx
    seed[where] = 1.0
    return seed

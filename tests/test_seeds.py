"""The seed helpers: exact arrays for each score, batch handling, and errors that say how to fix."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from onnx_gradcam import BadInputError, box_seed, class_seed, output_seed, region_seed
from onnx_gradcam.explain import seeds


def test_docstring_examples_hold() -> None:
    result = doctest.testmod(seeds, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 8 and result.failed == 0


def test_class_seed_is_one_hot_on_axis_1_at_every_position() -> None:
    np.testing.assert_array_equal(class_seed([1, 4], 2), np.array([[0, 0, 1, 0]], np.float32))
    np.testing.assert_array_equal(class_seed([2, 3], [2, 0]), [[0, 0, 1], [1, 0, 0]])
    dense = class_seed([1, 3, 2, 2], 1)
    expected = np.zeros((1, 3, 2, 2), np.float32)
    expected[0, 1] = 1
    np.testing.assert_array_equal(dense, expected)
    assert dense.dtype == np.float32


@pytest.mark.parametrize("batch_entry", [None, "batch", -1, 1])
def test_a_symbolic_batch_gives_one_row_and_batch_overrides(batch_entry: object) -> None:
    assert class_seed([batch_entry, 5], 0).shape == (1, 5)  # type: ignore[list-item]
    assert class_seed([batch_entry, 5], 0, batch=3).shape == (3, 5)  # type: ignore[list-item]
    np.testing.assert_array_equal(output_seed([batch_entry, 2], 1, batch=2), [[0, 1], [0, 1]])  # type: ignore[list-item]


def test_a_batch_size_in_the_shape_repeats_the_seed() -> None:
    np.testing.assert_array_equal(output_seed([3, 2], 0), [[1, 0]] * 3)
    s = region_seed([2, 2, 2, 3], 1, (0, 0, 1, 1))
    expected = np.zeros((2, 2, 2, 3), np.float32)
    expected[:, 1, 0, 0] = 1
    np.testing.assert_array_equal(s, expected)


def test_region_seed_box_and_mask() -> None:
    s = region_seed([1, 3, 4, 5], 2, (1, 0, 3, 2))  # x0, y0, x1, y1; x1, y1 exclusive
    expected = np.zeros((1, 3, 4, 5), np.float32)
    expected[0, 2, 0:2, 1:3] = 1
    np.testing.assert_array_equal(s, expected)
    mask = np.zeros((4, 5), bool)
    mask[1, 1] = mask[3, 4] = True
    expected = np.zeros((1, 3, 4, 5), np.float32)
    expected[0, 0] = mask
    np.testing.assert_array_equal(region_seed([1, 3, 4, 5], 0, mask), expected)


def test_region_seed_resizes_the_mask_by_nearest_neighbour() -> None:
    # an [8, 10] mask onto a [4, 5] output samples rows 1, 3, 5, 7 and columns 1, 3, 5, 7, 9
    mask = np.zeros((8, 10), bool)
    mask[:4, :6] = True
    np.testing.assert_array_equal(
        region_seed([1, 2, 4, 5], 1, mask)[0, 1],
        [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
    )
    # upsampling repeats: a [2, 2] mask onto [4, 4]
    np.testing.assert_array_equal(
        region_seed([1, 1, 4, 4], 0, np.array([[1, 0], [0, 1]], bool))[0, 0],
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
    )


def test_region_seed_on_sequences_and_per_sample_masks() -> None:
    s = region_seed([1, 2, 6], 1, np.array([0, 1, 1, 0, 0, 0], bool))  # [N, K, T]
    np.testing.assert_array_equal(s, [[[0, 0, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]])
    masks = np.zeros((2, 2, 2), bool)
    masks[0, 0, 0] = masks[1, 1, 1] = True
    s = region_seed([2, 2, 2, 2], [0, 1], masks)
    expected = np.zeros((2, 2, 2, 2), np.float32)
    expected[0, 0, 0, 0] = expected[1, 1, 1, 1] = 1
    np.testing.assert_array_equal(s, expected)


def test_box_seed_layouts() -> None:
    expected = np.zeros((1, 4, 7), np.float32)
    expected[0, 2, 6] = 1  # box 2, class 1 after x, y, w, h, objectness
    np.testing.assert_array_equal(box_seed([1, 4, 7], index=2, cls=1), expected)
    expected = np.zeros((1, 6, 5), np.float32)
    expected[0, 4 + 1, 3] = 1  # [N, 4 + classes, boxes] (YOLOv8)
    np.testing.assert_array_equal(box_seed([1, 6, 5], index=3, cls=1, box_axis=2, class_offset=4), expected)
    expected = np.zeros((2, 3, 6), np.float32)
    expected[0, 0, 5] = expected[1, 2, 5 + 0] = 1
    np.testing.assert_array_equal(box_seed([2, 3, 6], index=[0, 2], cls=0), expected)


def test_output_seed_scalar_and_tuple_index() -> None:
    np.testing.assert_array_equal(output_seed([1, 3], 2), np.array([[0, 0, 1]], np.float32))
    expected = np.zeros((1, 2, 3, 4), np.float32)
    expected[0, 1, 2, 3] = 1
    np.testing.assert_array_equal(output_seed([1, 2, 3, 4], (1, 2, 3)), expected)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: class_seed([1, 3], 3), "class 3 is out of range"),
        (lambda: class_seed([2, 3], [0, 1, 2]), "3 values of cls for a batch of 2"),
        (lambda: class_seed(["batch", "classes"], 0), "sizes unknown before running"),
        (lambda: class_seed([5], 0), "batch axis first"),
        (lambda: region_seed([1, 2, 4, 4], 0, (0, 0, 5, 4)), "not inside the 4x4 output"),
        (lambda: region_seed([1, 2, 8, 8], 0, np.zeros((8, 8), bool)), "region is empty"),
        (lambda: region_seed([1, 2, 8], 0, (0, 0, 4, 4)), "boolean array of rank 1"),
        (lambda: box_seed([1, 4, 7], index=4, cls=0), "box index 4 is out of range"),
        (lambda: box_seed([1, 4, 7], index=0, cls=2), "class 2 is out of range"),
        (lambda: box_seed([1, 3, 4, 7], index=0, cls=0), "use output_seed"),
        (lambda: output_seed([1, 2], 2), "does not fit outputs shaped [2]"),
        (lambda: output_seed([1, 2, 2], 1), "does not fit"),
    ],
)
def test_bad_arguments_say_how_to_fix(call, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BadInputError, match="to fix this") as err:
        call()
    assert message in str(err.value)

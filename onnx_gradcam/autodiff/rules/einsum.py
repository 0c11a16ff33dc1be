"""The gradient of Einsum: each operand's gradient is another Einsum of dY and the other operands.

Ellipses are spelled out as letters first, so that every gradient equation is explicit.
"""

from __future__ import annotations

import string
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
from onnx import helper

from ..builder import Shape
from ..context import RuleContext

Grads = list[str | None]


def _terms(ctx: RuleContext, node: onnx.NodeProto) -> tuple[list[list[str]], list[str], Iterator[str]]:
    """The operands' and the output's subscripts, one letter per axis (an ellipsis written out as
    letters, aligned right; an axis of size 1 that broadcasts against a larger one gets a letter of
    its own, summed away), and a supply of unused letters."""
    equation = ctx.attrs(node)["equation"]
    equation = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    lhs, arrow, rhs = equation.partition("->")
    raw = lhs.split(",")
    if len(raw) != len(node.input):
        raise ctx.unsupported(node, f"equation {equation!r} for {len(node.input)} operands")
    fresh = iter(c for c in string.ascii_letters if c not in equation)
    shapes = [ctx.info.shape(x) for x in node.input]
    widths = []
    for term, shape in zip(raw, shapes):
        if "..." not in term:
            widths.append(0)
        elif shape is None:
            raise ctx.unsupported(node, f"an ellipsis in {term!r} over an operand of unknown rank")
        else:
            widths.append(len(shape) - len(term.replace("...", "")))
    width = max(widths, default=0)
    dots = [next(fresh) for _ in range(width)]
    terms = [_spelled(term, dots[width - w :]) for term, w in zip(raw, widths)]
    if arrow:
        out = _spelled(rhs, dots)
    else:  # implicit output: the ellipsis, then the letters that occur once, in alphabetical order
        letters = [c for t in raw for c in t if c != "."]
        out = dots + sorted(c for c in set(letters) if letters.count(c) == 1)
    if len(set(out)) < len(out):
        raise ctx.unsupported(node, f"equation {equation!r} repeats a letter in its output")
    for t, shape in zip(terms, shapes):
        if shape is not None and len(shape) != len(t):
            raise ctx.unsupported(node, f"equation {equation!r} does not match an operand of rank {len(shape)}")
    _own_letters_for_broadcast(terms, shapes, fresh)
    return terms, out, fresh


def _spelled(term: str, dots: list[str]) -> list[str]:
    head, _, tail = term.partition("...")
    return list(head) + (dots if "..." in term else []) + list(tail)


def _own_letters_for_broadcast(terms: list[list[str]], shapes: Sequence[Shape | None], fresh: Iterator[str]) -> None:
    """An axis of size 1 under a letter that is larger on another operand broadcasts: give it a
    letter of its own (summed over a single element: the same forward value)."""
    sizes: dict[str, set[int | str | None]] = {}
    for t, shape in zip(terms, shapes):
        for pos, c in enumerate(t):
            sizes.setdefault(c, set()).add(shape[pos] if shape is not None else None)
    for t, shape in zip(terms, shapes):
        if shape is None:
            continue
        for pos, c in enumerate(t):
            if shape[pos] == 1 and sizes[c] != {1}:
                t[pos] = next(fresh)


def einsum(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """Y = einsum(X_1..X_n):  dX_i = einsum(dY, X_j (j != i) -> subscripts of X_i).

    A letter only X_i has (summed over in the forward) enters as a vector of ones; a letter
    repeated in X_i (a diagonal) is renamed and tied to the first by an identity matrix, so
    the gradient lies on that diagonal. Ellipses are written out as letters (broadcasting
    size-1 axes included); their operands' ranks must be known.
    """
    dy = dys[0]
    assert dy is not None
    terms, out, fresh = _terms(ctx, node)
    return [_operand_grad(ctx, node, dy, terms, out, fresh, i) if w else None for i, w in enumerate(wrt)]


def _operand_grad(
    ctx: RuleContext,
    node: onnx.NodeProto,
    dy: str,
    terms: list[list[str]],
    out: list[str],
    fresh: Iterator[str],
    i: int,
) -> str:
    x = node.input[i]
    inputs = [dy] + [n for j, n in enumerate(node.input) if j != i]
    subs = ["".join(out)] + ["".join(t) for j, t in enumerate(terms) if j != i]
    target: list[str] = []
    for pos, c in enumerate(terms[i]):
        if c in target:  # a diagonal: X_i's axis pos equals an earlier one
            renamed = next(fresh)
            inputs.append(_eye(ctx, x, pos))
            subs.append(c + renamed)
            target.append(renamed)
        else:
            target.append(c)
    present = set("".join(subs))
    for pos, c in enumerate(terms[i]):
        if c not in present:  # summed in X_i alone: dX_i is constant along it
            inputs.append(_ones(ctx, x, pos))
            subs.append(c)
            present.add(c)
    return ctx.b.op("Einsum", inputs, equation=",".join(subs) + "->" + "".join(target))


def _size(ctx: RuleContext, x: str, pos: int) -> int | str:
    shape = ctx.info.shape(x)
    dim = shape[pos] if shape is not None else None
    return dim if isinstance(dim, int) else ctx.b.shape_of(x, pos, pos + 1)


def _ones(ctx: RuleContext, x: str, pos: int) -> str:
    size = _size(ctx, x, pos)
    if isinstance(size, int):
        return ctx.const_like(x, np.ones(size), "ones")
    one = helper.make_tensor("value", ctx.info.grad_dtype(x), [1], [1])
    return ctx.b.op("ConstantOfShape", [size], hint="ones", value=one)


def _eye(ctx: RuleContext, x: str, pos: int) -> str:
    size = _size(ctx, x, pos)
    if isinstance(size, int):
        return ctx.const_like(x, np.eye(size), "eye")
    one = helper.make_tensor("value", ctx.info.grad_dtype(x), [1], [1])
    square = ctx.b.op("ConstantOfShape", [ctx.b.op("Concat", [size, size], axis=0)], value=one)
    return ctx.b.op("EyeLike", [square], hint="eye")

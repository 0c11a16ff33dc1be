"""Gradients of the recurrent ops LSTM, GRU and RNN with respect to the input sequence and the
initial states: unrolled over a sequence length known at prepare time, else a Loop over the steps.

The hidden states come from the node's own Y output (or a copy of the node that computes it),
so only LSTM's cell states are recomputed, step by step. W, R, B and P must be constants: their
gradients are not needed for Grad-CAM. Padded steps (sequence_lens) pass the state through, as
onnxruntime computes them; activations, their alpha/beta and clip follow onnxruntime's kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..context import RuleContext

Grads = list[str | None]

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}
# (takes alpha, takes beta, default alpha, default beta), as onnxruntime reads activation_alpha/beta:
# values are consumed in order, only by the activations that take them
_ACTIVATION_ARGS: dict[str, tuple[bool, bool, float | None, float | None]] = {
    "sigmoid": (False, False, None, None),
    "tanh": (False, False, None, None),
    "relu": (False, False, None, None),
    "softsign": (False, False, None, None),
    "softplus": (False, False, None, None),
    "leakyrelu": (True, False, 0.01, None),
    "elu": (True, False, 1.0, None),
    "hardsigmoid": (True, True, 0.2, 0.5),
    # no ONNX operator defines these defaults (onnxruntime takes 0, the spec's ThresholdedRelu 1)
    "thresholdedrelu": (True, False, None, None),
    "scaledtanh": (True, True, None, None),
    "affine": (True, True, None, None),
}


@dataclass(frozen=True)
class _Act:
    name: str
    alpha: float = 0.0
    beta: float = 0.0


def _activations(ctx: RuleContext, node: onnx.NodeProto, directions: int) -> list[list[_Act]]:
    """The activation functions of each direction (f, g, h for LSTM; f, g for GRU; f for RNN)."""
    a = ctx.attrs(node)
    per = len(_DEFAULT_ACTIVATIONS[node.op_type])
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in a.get("activations", [])]
    names = [n.lower() for n in names] or list(_DEFAULT_ACTIVATIONS[node.op_type]) * directions
    if len(names) != per * directions:
        raise ctx.unsupported(node, f"{len(names)} activations for {directions} direction(s) of {per} each")
    alphas, betas = list(a.get("activation_alpha", [])), list(a.get("activation_beta", []))
    acts = []
    for name in names:
        if name not in _ACTIVATION_ARGS:
            raise ctx.unsupported(node, f"activation {name!r} (the spec allows {sorted(_ACTIVATION_ARGS)})")
        takes_alpha, takes_beta, alpha0, beta0 = _ACTIVATION_ARGS[name]
        alpha, beta = alpha0, beta0
        if takes_alpha:
            alpha = float(alphas.pop(0)) if alphas else alpha0
        if takes_beta:
            beta = float(betas.pop(0)) if betas else beta0
        if (takes_alpha and alpha is None) or (takes_beta and beta is None):
            raise ctx.unsupported(
                node, f"activation {name!r} without activation_alpha/activation_beta (runtimes disagree on defaults)"
            )
        acts.append(_Act(name, alpha or 0.0, beta or 0.0))
    return [acts[d * per : (d + 1) * per] for d in range(directions)]


class _Cell:
    """Emits one direction's per-step forward values and their derivatives, in X's float type."""

    def __init__(self, ctx: RuleContext, like: str, clip: float | None) -> None:
        self.ctx, self.b, self.like, self.clip = ctx, ctx.b, like, clip

    def s(self, v: float) -> str:
        return self.ctx.scalar_like(self.like, v)

    def c(self, v: np.ndarray, hint: str) -> str:
        return self.ctx.const_like(self.like, v, hint)

    def op(self, op_type: str, *inputs: str, **attrs: Any) -> str:
        return str(self.b.op(op_type, list(inputs), **attrs))

    def add(self, a: str | None, b: str | None) -> str | None:
        if a is None:
            return b
        return a if b is None else self.op("Add", a, b)

    def clipped(self, z: str) -> str:
        """The activation's input: clip(z, -clip, clip) where the node clips."""
        return z if self.clip is None else self.op("Clip", z, self.s(-self.clip), self.s(self.clip))

    def unclip(self, z: str, dz: str) -> str:
        """dz where z lies strictly inside (-clip, clip), else 0."""
        if self.clip is None:
            return dz
        inside = self.op("Less", self.op("Abs", z), self.s(self.clip))
        return self.op("Where", inside, dz, self.s(0.0))

    def act(self, f: _Act, z: str) -> str:
        """y = f(z)."""
        op, s = self.op, self.s
        simple = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign", "softplus": "Softplus"}
        if f.name in simple:
            return op(simple[f.name], z)
        if f.name == "leakyrelu":
            return op("LeakyRelu", z, alpha=f.alpha)
        if f.name == "hardsigmoid":
            return op("HardSigmoid", z, alpha=f.alpha, beta=f.beta)
        if f.name == "elu":
            return op("Elu", z, alpha=f.alpha)
        if f.name == "thresholdedrelu":
            return op("Where", op("Greater", z, s(f.alpha)), z, s(0.0))
        if f.name == "scaledtanh":
            return op("Mul", op("Tanh", op("Mul", z, s(f.beta))), s(f.alpha))
        return op("Add", op("Mul", z, s(f.alpha)), s(f.beta))  # affine

    def slope(self, f: _Act, z: str, y: str) -> str:
        """f'(z), from z and y = f(z)."""
        op, s = self.op, self.s
        if f.name == "sigmoid":
            return op("Mul", y, op("Sub", s(1.0), y))
        if f.name == "tanh":
            return op("Sub", s(1.0), op("Mul", y, y))
        if f.name == "relu":
            return op("Where", op("Greater", z, s(0.0)), s(1.0), s(0.0))
        if f.name == "leakyrelu":
            return op("Where", op("Less", z, s(0.0)), s(f.alpha), s(1.0))
        if f.name == "thresholdedrelu":
            return op("Where", op("Greater", z, s(f.alpha)), s(1.0), s(0.0))
        if f.name == "hardsigmoid":
            u = op("Add", op("Mul", z, s(f.alpha)), s(f.beta))
            inside = op("And", op("Greater", u, s(0.0)), op("Less", u, s(1.0)))
            return op("Where", inside, s(f.alpha), s(0.0))
        if f.name == "elu":
            return op("Where", op("Less", z, s(0.0)), op("Mul", op("Exp", z), s(f.alpha)), s(1.0))
        if f.name == "softsign":
            d = op("Add", s(1.0), op("Abs", z))
            return op("Reciprocal", op("Mul", d, d))
        if f.name == "softplus":
            return op("Sigmoid", z)
        if f.name == "scaledtanh":
            t = op("Tanh", op("Mul", z, s(f.beta)))
            return op("Mul", op("Sub", s(1.0), op("Mul", t, t)), s(f.alpha * f.beta))
        return s(f.alpha)  # affine: a scalar, broadcast against the upstream gradient

    def gate(self, f: _Act, z: str) -> tuple[str, str]:
        """(y, f'(clip z) masked by the clip) of one gate's pre-activation z."""
        zc = self.clipped(z)
        y = self.act(f, zc)
        return y, self.unclip(z, self.slope(f, zc, y))


Idx = int | str  # a step: known at prepare time, or a scalar int64 tensor (inside a Loop body)
Step = Callable[[Idx, list[str]], tuple[str, list[str]]]


@dataclass
class _Plan:
    """What every recurrent op shares: the canonical [T, N, ...] views and run-time lengths."""

    seq: int | None  # T where known at prepare time; None: a Loop over the run-time length
    hidden: int
    directions: int
    layout: int
    like: str  # X itself: the element type of constants
    x: str  # [T, N, I]
    y: str  # [T, D, N, H]
    lens: str | None  # int64 [N, 1]: sequence_lens
    any_step: str | None  # bool [N, 1]: sequence_lens > 0 (onnxruntime zeroes Y_h/Y_c of empty rows)
    length: str = ""  # scalar int64: T at run time (Loop path only)


def _split(ctx: RuleContext, x: str, sizes: Sequence[int], axis: int) -> list[str]:
    if len(sizes) == 1:
        return [x]
    b = ctx.b
    if ctx.opset < 13:
        return list(b.op("Split", [x], axis=axis, split=list(sizes), outputs=len(sizes)))
    return list(b.op("Split", [x, b.const(np.array(sizes, np.int64), "split")], axis=axis, outputs=len(sizes)))


def _index(ctx: RuleContext, t: Idx) -> str:
    return ctx.b.const(np.array(t, np.int64), "step") if isinstance(t, int) else t


def _at(ctx: RuleContext, x: str, t: Idx, axis: int = 0) -> str:
    """x[t] along axis (the axis dropped)."""
    return str(ctx.b.op("Gather", [x, _index(ctx, t)], axis=axis))


def _plan(ctx: RuleContext, node: onnx.NodeProto) -> _Plan:
    a = ctx.attrs(node)
    gates = _GATES[node.op_type]
    layout = int(a.get("layout", 0))
    direction = a.get("direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    directions = 2 if direction == "bidirectional" else 1
    w = ctx.const_input(node, 1)
    assert w is not None
    hidden = int(a.get("hidden_size", w.shape[1] // gates))
    xshape = ctx.info.shape(node.input[0])
    seq = None if xshape is None or len(xshape) != 3 else xshape[1 if layout else 0]
    b = ctx.b
    x = node.input[0] if layout == 0 else b.transpose(node.input[0], [1, 0, 2])
    y = node.output[0] if node.output and node.output[0] else ""
    if not y:  # the hidden states of every step: a copy of the node that returns them
        y = b.op(node.op_type, list(node.input), hint="recurrent_y", **a)
    if layout == 1:
        y = b.transpose(y, [1, 2, 0, 3])
    lens = any_step = None
    lens_name = node.input[4] if len(node.input) > 4 else ""
    if lens_name:
        lens = b.unsqueeze(b.op("Cast", [lens_name], to=onnx.TensorProto.INT64), [1])  # [N, 1]
        any_step = b.op("Greater", [lens, b.const(np.array(0, np.int64), "step")])
    plan = _Plan(seq if isinstance(seq, int) else None, hidden, directions, layout, node.input[0], x, y, lens, any_step)
    if plan.seq is None:
        plan.length = b.squeeze(b.shape_of(x, 0, 1), [0])
    return plan


def _reverse(node: onnx.NodeProto, d: int) -> bool:
    direction = next((a.s.decode() for a in node.attribute if a.name == "direction"), "forward")
    return direction == "reverse" or (direction == "bidirectional" and d == 1)


def _state(ctx: RuleContext, node: onnx.NodeProto, p: _Plan, index: int) -> str | None:
    """An initial state [D, N, H] (layout 1: [N, D, H] transposed), or None where absent."""
    name = node.input[index] if len(node.input) > index else ""
    if not name:
        return None
    return name if p.layout == 0 else ctx.b.transpose(name, [1, 0, 2])


def _output_grad(ctx: RuleContext, p: _Plan, dy: str | None, full: bool) -> str | None:
    """dY canonical ([T, D, N, H]) or dY_h/dY_c canonical ([D, N, H])."""
    if dy is None or p.layout == 0:
        return dy
    return ctx.b.transpose(dy, [1, 2, 0, 3] if full else [1, 0, 2])


def _valid(ctx: RuleContext, p: _Plan, t: Idx) -> str | None:
    """bool [N, 1]: step t lies within sequence_lens (None: every step does)."""
    return None if p.lens is None else str(ctx.b.op("Less", [_index(ctx, t), p.lens]))


def _previous(ctx: RuleContext, p: _Plan, yd: str, h0: str, t: Idx, reverse: bool) -> str:
    """The hidden state a valid step t starts from: the previous step's Y, or the initial state."""
    b = ctx.b
    if isinstance(t, int) and p.seq is not None:
        if not reverse:
            return _at(ctx, yd, t - 1) if t > 0 else h0
        if t == p.seq - 1:
            return h0
        nxt = _valid(ctx, p, t + 1)
        return _at(ctx, yd, t + 1) if nxt is None else str(b.op("Where", [nxt, _at(ctx, yd, t + 1), h0]))
    assert isinstance(t, str)
    one, zero = b.const(np.array(1, np.int64), "step"), b.const(np.array(0, np.int64), "step")
    if not reverse:
        before = b.op("Max", [b.op("Sub", [t, one]), zero])
        return str(b.op("Where", [b.op("Greater", [t, zero]), _at(ctx, yd, before), h0]))
    after = b.op("Add", [t, one])
    inside = b.op("Less", [after, p.length])
    nxt = _valid(ctx, p, after)
    if nxt is not None:
        inside = b.op("And", [inside, nxt])
    last = b.op("Sub", [p.length, one])
    return str(b.op("Where", [inside, _at(ctx, yd, b.op("Min", [after, last])), h0]))


def _masked(ctx: RuleContext, p: _Plan, t: Idx, new: str, old: str) -> str:
    valid = _valid(ctx, p, t)
    return new if valid is None else str(ctx.b.op("Where", [valid, new, old]))


def _loop(
    ctx: RuleContext, p: _Plan, carried: list[str], body: Step, dtype: int, forward: bool, scans: int = 1
) -> tuple[list[str], list[str]]:
    """A Loop over the run-time length: iteration j handles step t = j (forward) or T-1-j, with
    body(t, carried) -> (scanned value, carried); returns (final carried, stacked scans in j order)."""
    b = ctx.b
    outer, b.nodes = b.nodes, []
    j, cond = b.fresh("loop_iter"), b.fresh("loop_cond")
    ins = [b.fresh("loop_carried") for _ in carried]
    t = j if forward else b.op("Sub", [b.op("Sub", [p.length, b.const(np.array(1, np.int64), "step")]), j])
    scanned, new = body(t, ins)
    outs = [b.op("Identity", [cond])] + [b.op("Identity", [v]) for v in [*new, scanned][: len(carried) + scans]]
    graph = helper.make_graph(
        b.nodes,
        b.fresh("loop_body"),
        [
            helper.make_tensor_value_info(j, TensorProto.INT64, []),
            helper.make_tensor_value_info(cond, TensorProto.BOOL, []),
        ]
        + [helper.make_tensor_value_info(n, dtype, None) for n in ins],
        [helper.make_tensor_value_info(outs[0], TensorProto.BOOL, [])]
        + [helper.make_tensor_value_info(n, dtype, None) for n in outs[1:]],
    )
    b.nodes = outer
    keep_going = b.const(np.array(True), "loop_cond")  # given, not left out: not every runtime takes ""
    results = list(b.op("Loop", [p.length, keep_going, *carried], outputs=len(carried) + scans, body=graph))
    return results[: len(carried)], results[len(carried) :]


def _backward(
    ctx: RuleContext, p: _Plan, reverse: bool, carry: list[str], step: Step, dtype: int
) -> tuple[str, list[str]]:
    """Run step(t, carry) -> (dZ_t, carry) backwards over the processing order; returns dZ stacked
    in time order [T, N, G H] and the final carry (the initial states' gradients)."""
    b = ctx.b
    if p.seq is not None:
        order = list(range(p.seq))[::-1] if reverse else list(range(p.seq))
        dz: dict[int, str] = {}
        for t in reversed(order):
            dz[t], carry = step(t, carry)
        return str(b.op("Concat", [b.unsqueeze(dz[t], [0]) for t in range(p.seq)], axis=0)), carry
    # the backward pass visits t = T-1 .. 0 (forward direction) or 0 .. T-1 (reverse)
    carry, (stacked,) = _loop(ctx, p, carry, step, dtype, forward=reverse)
    if not reverse:  # stacked from t = T-1 down: flip to time order
        big = np.iinfo(np.int64)
        flip = [b.const(np.array([v], np.int64), "flip") for v in (-1, big.min, 0, -1)]
        stacked = b.op("Slice", [stacked, *flip])
    return str(stacked), carry


def _finish(
    ctx: RuleContext,
    node: onnx.NodeProto,
    p: _Plan,
    wrt: Sequence[bool],
    dx_parts: list[str],
    dh0: list[str],
    dc0: list[str] | None,
) -> Grads:
    b = ctx.b
    out: Grads = [None] * len(node.input)
    for i in (1, 2, 3, 7):
        if i < len(wrt) and wrt[i]:
            raise ctx.unsupported(node, f"a gradient for input {i} ({node.input[i]!r}): only X and states")
    if wrt[0]:
        dx = dx_parts[0] if len(dx_parts) == 1 else b.op("Sum", dx_parts)
        out[0] = dx if p.layout == 0 else b.transpose(dx, [1, 0, 2])
    for index, parts in ((5, dh0), (6, dc0)):
        if index < len(wrt) and wrt[index] and parts is not None:
            stacked = b.op("Concat", [b.unsqueeze(g, [0]) for g in parts], axis=0)
            out[index] = stacked if p.layout == 0 else b.transpose(stacked, [1, 0, 2])
    return out


def _direction_inputs(ctx: RuleContext, node: onnx.NodeProto, p: _Plan, d: int) -> tuple[np.ndarray, ...]:
    """W_d [G H, I], R_d [G H, H], Wb_d, Rb_d [G H] as float64 arrays."""
    w, r = ctx.const_input(node, 1), ctx.const_input(node, 2)
    assert w is not None and r is not None
    gh = w.shape[1]
    bias = ctx.const_input(node, 3)
    bias = np.zeros((p.directions, 2 * gh)) if bias is None else bias
    f = np.float64
    return w[d].astype(f), r[d].astype(f), bias[d, :gh].astype(f), bias[d, gh:].astype(f)


def _initial_carry(ctx: RuleContext, p: _Plan, dfinal: str | None, d: int, zeros: str) -> str:
    if dfinal is None:
        return zeros
    g = _at(ctx, dfinal, d)
    return g if p.any_step is None else str(ctx.b.op("Where", [p.any_step, g, zeros]))


def _upstream(ctx: RuleContext, dy_dir: str | None, dh: str, t: Idx) -> str:
    """dH' of step t: the carried gradient plus dY_t."""
    return dh if dy_dir is None else str(ctx.b.op("Add", [dh, _at(ctx, dy_dir, t)]))


@dataclass
class _Direction:
    """One direction's constants and views."""

    reverse: bool
    w: np.ndarray
    r: np.ndarray
    wb: np.ndarray
    rb: np.ndarray
    yd: str  # [T, N, H]
    zeros: str  # [N, H]
    h0: str
    dy: str | None  # dY of this direction [T, N, H]


def _direction(
    ctx: RuleContext, node: onnx.NodeProto, p: _Plan, d: int, h0s: str | None, dy_full: str | None
) -> _Direction:
    w, r, wb, rb = _direction_inputs(ctx, node, p, d)
    yd = _at(ctx, p.y, d, axis=1)
    zeros = ctx.b.zeros_like(_at(ctx, yd, 0), ctx.info.grad_dtype(p.like))
    h0 = zeros if h0s is None else _at(ctx, h0s, d)
    dy = None if dy_full is None else _at(ctx, dy_full, d, axis=1)
    return _Direction(_reverse(node, d), w, r, wb, rb, yd, zeros, h0, dy)


def lstm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """i = f(X Wi' + H Ri' + Pi C + bi), fg = f(.. + Pf C) (1 - i with input_forget), c~ = g(X Wc' + H Rc' + bc),
    C' = fg C + i c~, o = f(.. + Po C'), H' = o h(C'):  dX_t = dZ_t W, dH = dZ R, dC = dC' fg + Pi dzi + Pf dzf.

    Backward over the steps of each direction (unrolled where the length is known at prepare time,
    else a Loop), from Y (the hidden states) and the cell states recomputed from it; dz = f'(z) *
    upstream inside |z| < clip; padded steps pass dH, dC through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    cell = _Cell(ctx, node.input[0], float(a["clip"]) if "clip" in a else None)
    coupled = bool(int(a.get("input_forget", 0)))
    acts = _activations(ctx, node, p.directions)
    peep = ctx.const_input(node, 7)
    h0s, c0s = _state(ctx, node, p, 5), _state(ctx, node, p, 6)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    dyc = _output_grad(ctx, p, dys[2] if len(dys) > 2 else None, False)
    b, hs, dtype = ctx.b, p.hidden, ctx.info.grad_dtype(p.like)

    def direction(d: int) -> tuple[str, str, str]:
        f, g, h = acts[d]
        di = _direction(ctx, node, p, d, h0s, dy_full)
        pi, po, pf = (None, None, None) if peep is None else (cell.c(v, "peephole") for v in np.split(peep[d], 3))
        c0 = di.zeros if c0s is None else _at(ctx, c0s, d)
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(di.w.T, "w_t")]), cell.c(di.wb + di.rb, "bias")])  # [T, N, 4H]
        r_t, r_mat = cell.c(di.r.T, "r_t"), cell.c(di.r, "r")

        def forward(t: Idx, c_prev: str) -> dict[str, str]:
            hp = _previous(ctx, p, di.yd, di.h0, t, di.reverse)
            zi, zo, zf, zc = _split(ctx, b.op("Add", [_at(ctx, xw, t), b.op("MatMul", [hp, r_t])]), [hs] * 4, 1)
            if pi is not None and pf is not None:
                zi = b.op("Add", [zi, b.op("Mul", [c_prev, pi])])
                zf = b.op("Add", [zf, b.op("Mul", [c_prev, pf])])
            i, d_i = cell.gate(f, zi)
            fg, d_f = (b.op("Sub", [cell.s(1.0), i]), "") if coupled else cell.gate(f, zf)
            cc, d_c = cell.gate(g, zc)
            c_new = b.op("Add", [b.op("Mul", [fg, c_prev]), b.op("Mul", [i, cc])])
            if po is not None:
                zo = b.op("Add", [zo, b.op("Mul", [c_new, po])])
            o, d_o = cell.gate(f, zo)
            hc = cell.act(h, c_new)
            return {"cp": c_prev, "c": c_new, "i": i, "di": d_i, "fg": fg, "df": d_f, "cc": cc, "dc": d_c,
                    "o": o, "do": d_o, "hc": hc, "dhc": cell.slope(h, c_new, hc)}  # fmt: skip

        saved: dict[int, dict[str, str]] = {}
        cps = ""  # Loop path: the cell state each step starts from, in processing order
        if p.seq is not None:
            c_prev = c0
            for t in list(range(p.seq))[::-1] if di.reverse else range(p.seq):
                saved[t] = forward(t, c_prev)
                c_prev = _masked(ctx, p, t, saved[t]["c"], c_prev)
        else:

            def forward_body(t: Idx, carried: list[str]) -> tuple[str, list[str]]:
                v = forward(t, carried[0])
                return carried[0], [_masked(ctx, p, t, v["c"], carried[0])]

            _, (cps,) = _loop(ctx, p, [c0], forward_body, dtype, forward=not di.reverse)

        def step(t: Idx, carry: list[str]) -> tuple[str, list[str]]:
            if isinstance(t, int):
                v = saved[t]
            else:  # the processing index of t: t (forward) or T-1-t (reverse)
                k = (
                    b.op("Sub", [b.op("Sub", [p.length, b.const(np.array(1, np.int64), "step")]), t])
                    if di.reverse
                    else t
                )
                v = forward(t, _at(ctx, cps, k))
            dh, dc = carry
            dhn = _upstream(ctx, di.dy, dh, t)
            dzo = b.op("Mul", [b.op("Mul", [dhn, v["hc"]]), v["do"]])
            dcn = b.op("Add", [dc, b.op("Mul", [b.op("Mul", [dhn, v["o"]]), v["dhc"]])])
            if po is not None:
                dcn = b.op("Add", [dcn, b.op("Mul", [dzo, po])])
            dgate_i, dgate_f = b.op("Mul", [dcn, v["cc"]]), b.op("Mul", [dcn, v["cp"]])
            dzc = b.op("Mul", [b.op("Mul", [dcn, v["i"]]), v["dc"]])
            dcp = b.op("Mul", [dcn, v["fg"]])
            if coupled:  # fg = 1 - i
                dzi = b.op("Mul", [b.op("Sub", [dgate_i, dgate_f]), v["di"]])
                dzf = b.op("Mul", [dgate_f, cell.s(0.0)])
            else:
                dzi, dzf = b.op("Mul", [dgate_i, v["di"]]), b.op("Mul", [dgate_f, v["df"]])
            if pi is not None and pf is not None:
                dcp = b.op("Add", [dcp, b.op("Mul", [dzi, pi])])
                if not coupled:
                    dcp = b.op("Add", [dcp, b.op("Mul", [dzf, pf])])
            dz = b.op("Concat", [dzi, dzo, dzf, dzc], axis=1)
            dhp = b.op("MatMul", [dz, r_mat])
            valid = _valid(ctx, p, t)
            if valid is not None:
                dz = b.op("Where", [valid, dz, cell.s(0.0)])
            return dz, [_masked(ctx, p, t, dhp, dh), _masked(ctx, p, t, dcp, dc)]

        carry0 = [_initial_carry(ctx, p, dyh, d, di.zeros), _initial_carry(ctx, p, dyc, d, di.zeros)]
        dz_all, (dh, dc) = _backward(ctx, p, di.reverse, carry0, step, dtype)
        return b.op("MatMul", [dz_all, cell.c(di.w, "w")]), dh, dc

    dx_parts, dh0, dc0 = (list(v) for v in zip(*(direction(d) for d in range(p.directions)), strict=True))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, dc0)


def gru(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """z = f(X Wz' + H Rz' + bz), r = f(X Wr' + H Rr' + br), h~ = g(a), a = X Wh' + (r H) Rh' + Rbh + Wbh
    (linear_before_reset: a = X Wh' + r (H Rh' + Rbh) + Wbh), H' = (1 - z) h~ + z H:  da = dH' (1 - z) g'(a),
    dz = dH' (H - h~) f'(z), dr = (da Rh) H f'(r), dX_t = [dz, dr, da] W, dH = dH' z + (da Rh) r + [dz, dr] Rzr.

    Backward over the steps of each direction (unrolled where the length is known at prepare time,
    else a Loop), the gates recomputed from Y (the hidden states); dz = f'(z) * upstream inside
    |z| < clip; padded steps pass dH through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    before_reset = bool(int(a.get("linear_before_reset", 0)))
    cell = _Cell(ctx, node.input[0], float(a["clip"]) if "clip" in a else None)
    acts = _activations(ctx, node, p.directions)
    h0s = _state(ctx, node, p, 5)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    b, hs, dtype = ctx.b, p.hidden, ctx.info.grad_dtype(p.like)

    def direction(d: int) -> tuple[str, str]:
        f, g = acts[d]
        di = _direction(ctx, node, p, d, h0s, dy_full)
        r, rb = di.r, di.rb
        bias = di.wb + np.concatenate([rb[: 2 * hs], np.zeros(hs) if before_reset else rb[2 * hs :]])
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(di.w.T, "w_t")]), cell.c(bias, "bias")])  # [T, N, 3H]
        rzr_t, rh_t = cell.c(r[: 2 * hs].T, "r_t"), cell.c(r[2 * hs :].T, "r_t")
        rzr, rh = cell.c(r[: 2 * hs], "r"), cell.c(r[2 * hs :], "r")
        rbh = cell.c(rb[2 * hs :], "bias")

        def step(t: Idx, carry: list[str]) -> tuple[str, list[str]]:
            hp = _previous(ctx, p, di.yd, di.h0, t, di.reverse)
            xz, xr, xh = _split(ctx, _at(ctx, xw, t), [hs] * 3, 1)
            hz, hr = _split(ctx, b.op("MatMul", [hp, rzr_t]), [hs] * 2, 1)
            z, dz_act = cell.gate(f, b.op("Add", [xz, hz]))
            rr, dr_act = cell.gate(f, b.op("Add", [xr, hr]))
            if before_reset:
                q = b.op("Add", [b.op("MatMul", [hp, rh_t]), rbh])
                ah = b.op("Add", [xh, b.op("Mul", [rr, q])])
            else:
                ah = b.op("Add", [xh, b.op("MatMul", [b.op("Mul", [rr, hp]), rh_t])])
            hh, dh_act = cell.gate(g, ah)
            (dh,) = carry
            dhn = _upstream(ctx, di.dy, dh, t)
            dah = b.op("Mul", [b.op("Mul", [dhn, b.op("Sub", [cell.s(1.0), z])]), dh_act])
            dzz = b.op("Mul", [b.op("Mul", [dhn, b.op("Sub", [hp, hh])]), dz_act])
            dhp = b.op("Mul", [dhn, z])
            if before_reset:
                drr = b.op("Mul", [dah, q])
                dhp = b.op("Add", [dhp, b.op("MatMul", [b.op("Mul", [dah, rr]), rh])])
            else:
                drh = b.op("MatMul", [dah, rh])  # d(r H)
                drr = b.op("Mul", [drh, hp])
                dhp = b.op("Add", [dhp, b.op("Mul", [drh, rr])])
            dzr = b.op("Mul", [drr, dr_act])
            dhp = b.op("Add", [dhp, b.op("MatMul", [b.op("Concat", [dzz, dzr], axis=1), rzr])])
            dz = b.op("Concat", [dzz, dzr, dah], axis=1)
            valid = _valid(ctx, p, t)
            if valid is not None:
                dz = b.op("Where", [valid, dz, cell.s(0.0)])
            return dz, [_masked(ctx, p, t, dhp, dh)]

        dz_all, (dh,) = _backward(ctx, p, di.reverse, [_initial_carry(ctx, p, dyh, d, di.zeros)], step, dtype)
        return b.op("MatMul", [dz_all, cell.c(di.w, "w")]), dh

    dx_parts, dh0 = (list(v) for v in zip(*(direction(d) for d in range(p.directions)), strict=True))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, None)


def rnn(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """H' = f(X Wi' + H Ri' + Wbi + Rbi):  dZ_t = f'(Z_t) (dY_t + dH'),  dX_t = dZ_t W,  dH = dZ_t R.

    Backward over the steps of each direction (unrolled where the length is known at prepare time,
    else a Loop), the pre-activations recomputed from Y (the hidden states); dZ is 0 outside
    |Z| < clip; padded steps pass dH through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    cell = _Cell(ctx, node.input[0], float(a["clip"]) if "clip" in a else None)
    acts = _activations(ctx, node, p.directions)
    h0s = _state(ctx, node, p, 5)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    b, dtype = ctx.b, ctx.info.grad_dtype(p.like)

    def direction(d: int) -> tuple[str, str]:
        (f,) = acts[d]
        di = _direction(ctx, node, p, d, h0s, dy_full)
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(di.w.T, "w_t")]), cell.c(di.wb + di.rb, "bias")])
        r_t, r_mat = cell.c(di.r.T, "r_t"), cell.c(di.r, "r")

        def step(t: Idx, carry: list[str]) -> tuple[str, list[str]]:
            hp = _previous(ctx, p, di.yd, di.h0, t, di.reverse)
            _, slope = cell.gate(f, b.op("Add", [_at(ctx, xw, t), b.op("MatMul", [hp, r_t])]))
            (dh,) = carry
            dz = b.op("Mul", [_upstream(ctx, di.dy, dh, t), slope])
            dhp = b.op("MatMul", [dz, r_mat])
            valid = _valid(ctx, p, t)
            if valid is not None:
                dz = b.op("Where", [valid, dz, cell.s(0.0)])
            return dz, [_masked(ctx, p, t, dhp, dh)]

        dz_all, (dh,) = _backward(ctx, p, di.reverse, [_initial_carry(ctx, p, dyh, d, di.zeros)], step, dtype)
        return b.op("MatMul", [dz_all, cell.c(di.w, "w")]), dh

    dx_parts, dh0 = (list(v) for v in zip(*(direction(d) for d in range(p.directions)), strict=True))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, None)

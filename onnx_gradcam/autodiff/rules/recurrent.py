"""Gradients of the recurrent ops LSTM, GRU and RNN with respect to the input sequence and the
initial states, unrolled over a sequence length known at prepare time.

The hidden states come from the node's own Y output (or a copy of the node that computes it),
so only LSTM's cell states are recomputed, step by step. W, R, B and P must be constants: their
gradients are not needed for Grad-CAM. Padded steps (sequence_lens) pass the state through, as
onnxruntime computes them; activations, their alpha/beta and clip follow onnxruntime's kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

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


@dataclass
class _Plan:
    """What every recurrent op shares: the canonical [T, N, ...] views and run-time masks."""

    seq: int  # T
    hidden: int
    directions: int
    layout: int
    like: str  # X itself: the element type of constants
    x: str  # [T, N, I]
    y: str  # [T, D, N, H]
    valid: list[str] | None  # per step t: bool [N, 1], t < sequence_lens
    any_step: str | None  # bool [N, 1]: sequence_lens > 0 (onnxruntime zeroes Y_h/Y_c of empty rows)


def _split(ctx: RuleContext, x: str, sizes: Sequence[int], axis: int) -> list[str]:
    if len(sizes) == 1:
        return [x]
    b = ctx.b
    if ctx.opset < 13:
        return list(b.op("Split", [x], axis=axis, split=list(sizes), outputs=len(sizes)))
    return list(b.op("Split", [x, b.const(np.array(sizes, np.int64), "split")], axis=axis, outputs=len(sizes)))


def _step(ctx: RuleContext, x: str, t: int, axis: int = 0) -> str:
    return str(ctx.b.op("Gather", [x, ctx.b.const(np.array(t, np.int64), "step")], axis=axis))


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
    if not isinstance(seq, int):
        raise ctx.unsupported(
            node,
            "a sequence length not known at prepare time (the backward pass is unrolled over the steps): "
            "export the model with a fixed sequence length (a fixed input width for a CRNN)",
        )
    b = ctx.b
    x = node.input[0] if layout == 0 else b.transpose(node.input[0], [1, 0, 2])
    y = node.output[0] if node.output and node.output[0] else ""
    if not y:  # the hidden states of every step: a copy of the node that returns them
        y = b.op(node.op_type, list(node.input), hint="recurrent_y", **a)
    if layout == 1:
        y = b.transpose(y, [1, 2, 0, 3])
    valid = any_step = None
    lens_name = node.input[4] if len(node.input) > 4 else ""
    if lens_name:
        lens = b.unsqueeze(b.op("Cast", [lens_name], to=onnx.TensorProto.INT64), [1])  # [N, 1]
        valid = [b.op("Less", [b.const(np.array(t, np.int64), "step"), lens]) for t in range(seq)]
        any_step = b.op("Greater", [lens, b.const(np.array(0, np.int64), "step")])
    return _Plan(seq, hidden, directions, layout, node.input[0], x, y, valid, any_step)


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


def _previous(ctx: RuleContext, p: _Plan, y_steps: list[str], h0: str, t: int, reverse: bool) -> str:
    """The hidden state a valid step t starts from: the previous step's Y, or the initial state."""
    if not reverse:
        return y_steps[t - 1] if t > 0 else h0
    if t == p.seq - 1:
        return h0
    if p.valid is None:
        return y_steps[t + 1]
    return str(ctx.b.op("Where", [p.valid[t + 1], y_steps[t + 1], h0]))


def _masked(ctx: RuleContext, p: _Plan, t: int, new: str, old: str) -> str:
    return new if p.valid is None else str(ctx.b.op("Where", [p.valid[t], new, old]))


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


def _zeros_state(ctx: RuleContext, p: _Plan, y_step: str) -> str:
    return ctx.b.zeros_like(y_step, ctx.info.grad_dtype(p.like))


def _dy_steps(ctx: RuleContext, p: _Plan, dy_full: str | None, d: int) -> list[str | None]:
    if dy_full is None:
        return [None] * p.seq
    dyd = _step(ctx, dy_full, d, axis=1)
    return [_step(ctx, dyd, t) for t in range(p.seq)]


def _initial_carry(ctx: RuleContext, p: _Plan, dfinal: str | None, d: int, zeros: str) -> str:
    if dfinal is None:
        return zeros
    g = _step(ctx, dfinal, d)
    return g if p.any_step is None else str(ctx.b.op("Where", [p.any_step, g, zeros]))


def lstm(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """i = f(X Wi' + H Ri' + Pi C + bi), fg = f(.. + Pf C) (1 - i with input_forget), c~ = g(X Wc' + H Rc' + bc),
    C' = fg C + i c~, o = f(.. + Po C'), H' = o h(C'):  dX_t = dZ_t W, dH = dZ R, dC = dC' fg + Pi dzi + Pf dzf.

    Backward over the unrolled steps of each direction, from Y (the hidden states) and the cell states
    recomputed from it; dz = f'(z) * upstream inside |z| < clip; padded steps pass dH, dC through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    clip = float(a["clip"]) if "clip" in a else None
    cell = _Cell(ctx, node.input[0], clip)
    coupled = bool(int(a.get("input_forget", 0)))
    acts = _activations(ctx, node, p.directions)
    peep = ctx.const_input(node, 7)
    h0s, c0s = _state(ctx, node, p, 5), _state(ctx, node, p, 6)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    dyc = _output_grad(ctx, p, dys[2] if len(dys) > 2 else None, False)
    b, hs = ctx.b, p.hidden
    dx_parts, dh0, dc0 = [], [], []
    for d in range(p.directions):
        f, g, h = acts[d]
        rev = _reverse(node, d)
        w, r, wb, rb = _direction_inputs(ctx, node, p, d)
        pi, po, pf = (np.zeros(hs), np.zeros(hs), np.zeros(hs)) if peep is None else np.split(peep[d], 3)
        yd = _step(ctx, p.y, d, axis=1)
        y_steps = [_step(ctx, yd, t) for t in range(p.seq)]
        zeros = _zeros_state(ctx, p, y_steps[0])
        h0 = zeros if h0s is None else _step(ctx, h0s, d)
        c0 = zeros if c0s is None else _step(ctx, c0s, d)
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(w.T, "w_t")]), cell.c(wb + rb, "bias")])  # [T, N, 4H]
        r_t = cell.c(r.T, "r_t")
        order = list(range(p.seq))[::-1] if rev else list(range(p.seq))
        saved: dict[int, dict[str, str]] = {}
        c_prev = c0
        for t in order:  # forward: the cell states
            hp = _previous(ctx, p, y_steps, h0, t, rev)
            pre = b.op("Add", [_step(ctx, xw, t), b.op("MatMul", [hp, r_t])])
            zi, zo, zf, zc = _split(ctx, pre, [hs] * 4, 1)
            if peep is not None:
                zi = b.op("Add", [zi, b.op("Mul", [c_prev, cell.c(pi, "peephole")])])
                zf = b.op("Add", [zf, b.op("Mul", [c_prev, cell.c(pf, "peephole")])])
            i, di = cell.gate(f, zi)
            if coupled:
                fg, dfg = b.op("Sub", [cell.s(1.0), i]), None
            else:
                fg, dfg = cell.gate(f, zf)
            cc, dcc = cell.gate(g, zc)
            c_new = b.op("Add", [b.op("Mul", [fg, c_prev]), b.op("Mul", [i, cc])])
            if peep is not None:
                zo = b.op("Add", [zo, b.op("Mul", [c_new, cell.c(po, "peephole")])])
            o, do = cell.gate(f, zo)
            hc = cell.act(h, c_new)
            dhc = cell.slope(h, c_new, hc)
            saved[t] = {"cp": c_prev, "i": i, "di": di, "fg": fg, "cc": cc, "dcc": dcc, "o": o, "do": do}
            saved[t] |= {"hc": hc, "dhc": dhc} | ({} if dfg is None else {"dfg": dfg})
            c_prev = _masked(ctx, p, t, c_new, c_prev)
        dys_d = _dy_steps(ctx, p, dy_full, d)
        dh = _initial_carry(ctx, p, dyh, d, zeros)
        dc = _initial_carry(ctx, p, dyc, d, zeros)
        dz_steps: dict[int, str] = {}
        r_mat = cell.c(r, "r")
        for t in reversed(order):  # backward
            v = saved[t]
            dhn = cell.add(dh, dys_d[t])
            assert dhn is not None
            dzo = b.op("Mul", [b.op("Mul", [dhn, v["hc"]]), v["do"]])
            dcn = b.op("Add", [dc, b.op("Mul", [b.op("Mul", [dhn, v["o"]]), v["dhc"]])])
            if peep is not None:
                dcn = b.op("Add", [dcn, b.op("Mul", [dzo, cell.c(po, "peephole")])])
            dgate_i = b.op("Mul", [dcn, v["cc"]])
            dgate_f = b.op("Mul", [dcn, v["cp"]])
            dzc = b.op("Mul", [b.op("Mul", [dcn, v["i"]]), v["dcc"]])
            dcp = b.op("Mul", [dcn, v["fg"]])
            if coupled:  # fg = 1 - i
                dzi = b.op("Mul", [b.op("Sub", [dgate_i, dgate_f]), v["di"]])
                dzf = b.op("Mul", [dgate_f, cell.s(0.0)])
            else:
                dzi = b.op("Mul", [dgate_i, v["di"]])
                dzf = b.op("Mul", [dgate_f, v["dfg"]])
            if peep is not None:
                dcp = b.op("Add", [dcp, b.op("Mul", [dzi, cell.c(pi, "peephole")])])
                if not coupled:
                    dcp = b.op("Add", [dcp, b.op("Mul", [dzf, cell.c(pf, "peephole")])])
            dz = b.op("Concat", [dzi, dzo, dzf, dzc], axis=1)
            dhp = b.op("MatMul", [dz, r_mat])
            if p.valid is not None:
                dz = b.op("Where", [p.valid[t], dz, cell.s(0.0)])
            dz_steps[t] = dz
            dh, dc = _masked(ctx, p, t, dhp, dh), _masked(ctx, p, t, dcp, dc)
        dh0.append(dh)
        dc0.append(dc)
        dx_parts.append(_dx(ctx, cell, dz_steps, p, w))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, dc0)


def _dx(ctx: RuleContext, cell: _Cell, dz_steps: dict[int, str], p: _Plan, w: np.ndarray) -> str:
    """dX [T, N, I] = stack_t(dZ_t) W."""
    b = ctx.b
    stacked = b.op("Concat", [b.unsqueeze(dz_steps[t], [0]) for t in range(p.seq)], axis=0)
    return str(b.op("MatMul", [stacked, cell.c(w, "w")]))


def gru(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """z = f(X Wz' + H Rz' + bz), r = f(X Wr' + H Rr' + br), h~ = g(a), a = X Wh' + (r H) Rh' + Rbh + Wbh
    (linear_before_reset: a = X Wh' + r (H Rh' + Rbh) + Wbh), H' = (1 - z) h~ + z H:  da = dH' (1 - z) g'(a),
    dz = dH' (H - h~) f'(z), dr = (da Rh) H f'(r), dX_t = [dz, dr, da] W, dH = dH' z + (da Rh) r + [dz, dr] Rzr.

    Backward over the unrolled steps of each direction, the gates recomputed from Y (the hidden
    states); dz = f'(z) * upstream inside |z| < clip; padded steps pass dH through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    clip = float(a["clip"]) if "clip" in a else None
    before_reset = bool(int(a.get("linear_before_reset", 0)))
    cell = _Cell(ctx, node.input[0], clip)
    acts = _activations(ctx, node, p.directions)
    h0s = _state(ctx, node, p, 5)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    b, hs = ctx.b, p.hidden
    dx_parts, dh0 = [], []
    for d in range(p.directions):
        f, g = acts[d]
        rev = _reverse(node, d)
        w, r, wb, rb = _direction_inputs(ctx, node, p, d)
        yd = _step(ctx, p.y, d, axis=1)
        y_steps = [_step(ctx, yd, t) for t in range(p.seq)]
        zeros = _zeros_state(ctx, p, y_steps[0])
        h0 = zeros if h0s is None else _step(ctx, h0s, d)
        bias = wb + np.concatenate([rb[: 2 * hs], np.zeros(hs) if before_reset else rb[2 * hs :]])
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(w.T, "w_t")]), cell.c(bias, "bias")])  # [T, N, 3H]
        rzr_t, rh_t = cell.c(r[: 2 * hs].T, "r_t"), cell.c(r[2 * hs :].T, "r_t")
        rzr, rh = cell.c(r[: 2 * hs], "r"), cell.c(r[2 * hs :], "r")
        rbh = cell.c(rb[2 * hs :], "bias")
        order = list(range(p.seq))[::-1] if rev else list(range(p.seq))
        dys_d = _dy_steps(ctx, p, dy_full, d)
        dh = _initial_carry(ctx, p, dyh, d, zeros)
        dz_steps: dict[int, str] = {}
        for t in reversed(order):
            hp = _previous(ctx, p, y_steps, h0, t, rev)
            xz, xr, xh = _split(ctx, _step(ctx, xw, t), [hs] * 3, 1)
            hz, hr = _split(ctx, b.op("MatMul", [hp, rzr_t]), [hs] * 2, 1)
            z, dz_act = cell.gate(f, b.op("Add", [xz, hz]))
            rr, dr_act = cell.gate(f, b.op("Add", [xr, hr]))
            if before_reset:
                q = b.op("Add", [b.op("MatMul", [hp, rh_t]), rbh])
                ah = b.op("Add", [xh, b.op("Mul", [rr, q])])
            else:
                ah = b.op("Add", [xh, b.op("MatMul", [b.op("Mul", [rr, hp]), rh_t])])
            hh, dh_act = cell.gate(g, ah)
            dhn = cell.add(dh, dys_d[t])
            assert dhn is not None
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
            if p.valid is not None:
                dz = b.op("Where", [p.valid[t], dz, cell.s(0.0)])
            dz_steps[t] = dz
            dh = _masked(ctx, p, t, dhp, dh)
        dh0.append(dh)
        dx_parts.append(_dx(ctx, cell, dz_steps, p, w))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, None)


def rnn(ctx: RuleContext, node: onnx.NodeProto, dys: Sequence[str | None], wrt: Sequence[bool]) -> Grads:
    """H' = f(X Wi' + H Ri' + Wbi + Rbi):  dZ_t = f'(Z_t) (dY_t + dH'),  dX_t = dZ_t W,  dH = dZ_t R.

    Backward over the unrolled steps of each direction, the pre-activations recomputed from Y (the
    hidden states); dZ is 0 outside |Z| < clip; padded steps pass dH through.
    """
    p = _plan(ctx, node)
    a = ctx.attrs(node)
    clip = float(a["clip"]) if "clip" in a else None
    cell = _Cell(ctx, node.input[0], clip)
    acts = _activations(ctx, node, p.directions)
    h0s = _state(ctx, node, p, 5)
    dy_full = _output_grad(ctx, p, dys[0], True)
    dyh = _output_grad(ctx, p, dys[1] if len(dys) > 1 else None, False)
    b = ctx.b
    dx_parts, dh0 = [], []
    for d in range(p.directions):
        (f,) = acts[d]
        rev = _reverse(node, d)
        w, r, wb, rb = _direction_inputs(ctx, node, p, d)
        yd = _step(ctx, p.y, d, axis=1)
        y_steps = [_step(ctx, yd, t) for t in range(p.seq)]
        zeros = _zeros_state(ctx, p, y_steps[0])
        h0 = zeros if h0s is None else _step(ctx, h0s, d)
        xw = b.op("Add", [b.op("MatMul", [p.x, cell.c(w.T, "w_t")]), cell.c(wb + rb, "bias")])
        r_t, r_mat = cell.c(r.T, "r_t"), cell.c(r, "r")
        order = list(range(p.seq))[::-1] if rev else list(range(p.seq))
        dys_d = _dy_steps(ctx, p, dy_full, d)
        dh = _initial_carry(ctx, p, dyh, d, zeros)
        dz_steps: dict[int, str] = {}
        for t in reversed(order):
            hp = _previous(ctx, p, y_steps, h0, t, rev)
            _, slope = cell.gate(f, b.op("Add", [_step(ctx, xw, t), b.op("MatMul", [hp, r_t])]))
            dhn = cell.add(dh, dys_d[t])
            assert dhn is not None
            dz = b.op("Mul", [dhn, slope])
            dhp = b.op("MatMul", [dz, r_mat])
            if p.valid is not None:
                dz = b.op("Where", [p.valid[t], dz, cell.s(0.0)])
            dz_steps[t] = dz
            dh = _masked(ctx, p, t, dhp, dh)
        dh0.append(dh)
        dx_parts.append(_dx(ctx, cell, dz_steps, p, w))
    return _finish(ctx, node, p, wrt, dx_parts, dh0, None)

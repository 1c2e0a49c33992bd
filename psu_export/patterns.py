"""Patterns: recognise hand-written neuron recurrences in a captured graph.

A plain PyTorch ``forward`` that loops over time with tensors for the membrane::

    v = beta * v + fc(x[t])            # charge (any order of the two terms / factors)
    s = spike_fn(v - thr)              # autograd surrogate whose forward is (x > 0).float(),
                                       # (v >= thr).float(), torch.heaviside(v - thr, 0), ...
    v = v - s.detach() * thr           # subtract reset   | v = v * (1 - s)  zero reset | none
                                       # (zero reset also torch.where(s > 0, 0, v), v.masked_fill(s.bool(), 0),
                                       #  torch.where(v > thr, 0, v), v[s > 0] = 0; updates may be in place:
                                       #  v -= s * thr, v *= 1 - s, v.masked_fill_(...), see _out_of_place)

has no neuron module, so :func:`psu_export.capture.capture` (``torch.export`` with no
opaque neurons) records the recurrence as ordinary ATen ops carrying ``v`` between the
unrolled steps.  :func:`apply_patterns` finds each such per-step recurrence, checks that
it is *exactly* one :class:`~psu_export.spec.NeuronSpec` (``reset_timing="same_step"``,
the spec's op order), and replaces every step by the opaque neuron call
(``torch.ops.psu_capture.neuron``) plus a :class:`~psu_export.capture.NeuronModule`
record, so re-rolling, rewriting, export and verification run unchanged.

Rules follow onnxscript's rewriter: a *pattern* (where the rule looks), a *check* (is it
exactly the spec?) and a *replacement*; a failed check carries the node where matching
stopped and why.  Two rules:

``lif``         a comparison against a constant threshold whose spike drives a reset of
                the charged value ``decay * v + d``; the reset may be written before the
                charge (``v = v - s * thr`` at the top of the next step): the data flow
                is the same, and the value carried is then the pre-reset membrane, which
                must not be used outside the neuron (the spec reports the post-reset one)
``integrator``  a reset-free chain ``v = decay * v + d`` (readouts): a spec with
                ``reset="none"`` and threshold ``+inf``; a plain running sum ``acc = acc + d``
                (a spike counter) is left to the re-roll, which computes it as one
                cumulative sum (:attr:`psu_export.find.TimeLoop.accumulators`)

Op-order rules that keep spikes bit-exact (NeuronSpec docstring, same-step timing):
``decay * v + d`` (IEEE ``*`` and ``+`` commute exactly); ``h - thr > 0`` is the same
test as ``h > thr`` (with gradual underflow ``a - b`` is 0 only when ``a == b`` and keeps
its sign); ``h - s * thr``; ``h * (1 - s)`` and ``h - h * s`` equal ``s * 0 + (1 - s) * h``, and
so does ``where(s, 0, h)`` but for the sign of a zero membrane (which no spike test sees).
SpikingJelly-style charges written by hand (``v = v + (x - (v - v_rest)) / tau``,
``v = v - (v - v_rest) / tau + x`` and their ``* inv_tau`` forms) map to the spec's
``charge="sj_*"`` forms, which keep that op order.  Other forms are refused with the node
and the reason, never approximated.

Anything left over (a carried value no rule recognised) is refused by the re-roll in
:mod:`psu_export.find` with the node where matching stopped (exit code 3).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx
from torch.overrides import TorchFunctionMode

from .capture import METADATA_ASSERTS, OPAQUE_NEURON, CapturedGraph, InputLayout, NeuronModule, capture, module_path, probe_sequence
from .converters import CallConvention, FrameworkConverter
from .errors import NotConvertibleError, UsageError
from .find import _whole_slice_of, reroll
from .loading import LoadedModel
from .spec import NEVER_FIRES, NeuronSpec

aten = torch.ops.aten

# ------------------------------------------------------------------ op tables

_CMP = {
    aten.gt.Scalar: "gt", aten.gt.Tensor: "gt", aten.ge.Scalar: "ge", aten.ge.Tensor: "ge",
    aten.lt.Scalar: "lt", aten.lt.Tensor: "lt", aten.le.Scalar: "le", aten.le.Tensor: "le",
}
_HEAVISIDE = aten.heaviside.default
_COMPARE_TARGETS = set(_CMP) | {_HEAVISIDE}
#: torch-level names of the same comparisons (eager recording, see :class:`_CompareRecorder`)
_COMPARE_FUNCS = {"gt", "ge", "lt", "le", "greater", "greater_equal", "less", "less_equal",
                  "__gt__", "__ge__", "__lt__", "__le__", "heaviside"}
_ALIASES = {aten.detach.default, aten.clone.default, aten.alias.default, aten.contiguous.default, aten.lift_fresh_copy.default}
#: ops whose result shares memory with their input
_VIEWS = {aten.view.default, aten.reshape.default, aten.expand.default, aten.alias.default, aten.slice.Tensor, aten.select.int,
          aten.transpose.int, aten.permute.default, aten.squeeze.dim, aten.unsqueeze.default, aten.t.default, aten.detach.default}
_FILLS = {
    aten.zeros.default: lambda n: 0.0,
    aten.zeros_like.default: lambda n: 0.0,
    aten.new_zeros.default: lambda n: 0.0,
    aten.ones.default: lambda n: 1.0,
    aten.ones_like.default: lambda n: 1.0,
    aten.new_ones.default: lambda n: 1.0,
    aten.full.default: lambda n: n.args[1],
    aten.full_like.default: lambda n: n.args[1],
    aten.new_full.default: lambda n: n.args[2],
    aten.scalar_tensor.default: lambda n: n.args[0],
}
_ELEMENTWISE = {
    aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar, aten.mul.Tensor, aten.mul.Scalar,
    aten.div.Tensor, aten.div.Scalar, aten.rsub.Scalar, aten.rsub.Tensor, aten.neg.default, aten.reciprocal.default,
    aten.sigmoid.default, aten.exp.default, aten.log.default, aten.sqrt.default, aten.tanh.default, aten.abs.default,
    aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.pow.Tensor_Scalar, aten.pow.Scalar,
    aten.to.dtype, aten._to_copy.default, aten.detach.default, aten.detach_.default, aten.clone.default, aten.alias.default,
    aten.lift_fresh_copy.default, aten.view.default, aten.reshape.default, aten.expand.default,
}


class _Fail(Exception):
    """A failed check: the node where matching stopped and why."""

    def __init__(self, node, why: str):
        self.node = node
        self.why = why
        super().__init__(f"node {getattr(node, 'name', node)}: {why}")


def _is_node(a) -> bool:
    return isinstance(a, fx.Node)


def _users(node: fx.Node) -> list[fx.Node]:
    return [u for u in node.users if u.target not in METADATA_ASSERTS]


def _fetch_attr(gm: torch.nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


class _Consts:
    """Evaluates nodes that do not depend on the input (parameters, constants, fills)."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.cache: dict[fx.Node, torch.Tensor | None] = {}

    def value(self, a) -> torch.Tensor | None:
        if isinstance(a, bool):
            return None
        if isinstance(a, (int, float)):
            return torch.tensor(float(a), dtype=torch.float32)
        if not _is_node(a):
            return None
        if a not in self.cache:
            self.cache[a] = self._eval(a)
        return self.cache[a]

    def _raw(self, a):
        if _is_node(a):
            return self.value(a)
        return a

    def _eval(self, n: fx.Node):
        try:
            if n.op == "get_attr":
                v = _fetch_attr(self.gm, n.target)
                return v.detach().float() if isinstance(v, torch.Tensor) else None
            if n.op != "call_function":
                return None
            if n.target in _FILLS:
                fill = _FILLS[n.target](n)
                return None if _is_node(fill) else torch.tensor(float(fill), dtype=torch.float32)
            if n.target not in _ELEMENTWISE:
                return None
            args = [self._raw(a) for a in n.args]
            if any(_is_node(a) for a in n.args) and any(v is None for a, v in zip(n.args, args) if _is_node(a)):
                return None
            kwargs = {k: v for k, v in n.kwargs.items() if not _is_node(v)}
            if n.target in (aten.view.default, aten.reshape.default, aten.expand.default):
                return None if args[0] is None else args[0]  # shape ops of a constant: value unchanged per element
            out = n.target(*args, **kwargs)
            return out.detach().float() if isinstance(out, torch.Tensor) else None
        except Exception:
            return None


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    try:
        a2, b2 = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    return bool(torch.equal(a2, b2))


# ------------------------------------------------------------------ one step of a neuron


@dataclass
class _Charge:
    """``h = decay * v_prev + drive`` (decay None: ``v_prev + drive``)."""

    v_prev: object  # fx.Node or a python number (step 0 with ``v = 0.``)
    decay: torch.Tensor | None
    drive: fx.Node
    mul: fx.Node | None
    form: str = "leaky"  # NeuronSpec.charge
    params: dict = field(default_factory=dict)  # the form's parameters (tau, inv_tau, v_rest)
    extra: list = field(default_factory=list)  # intermediate nodes of the charge

    def nodes(self) -> list:
        return ([self.mul] if self.mul is not None else []) + list(self.extra)

    def same_law(self, other: "_Charge") -> bool:
        if self.form != other.form:
            return False
        if self.form == "leaky":
            return (self.decay is None) == (other.decay is None) and (self.decay is None or _same(self.decay, other.decay))
        return self.params.keys() == other.params.keys() and all(_same(self.params[k], other.params[k]) for k in self.params)


@dataclass(eq=False)
class _Step:
    """One time step of a candidate neuron."""

    h: fx.Node
    charges: list[_Charge]
    compare: fx.Node | None = None
    threshold: torch.Tensor | None = None
    cmp: str = "gt"
    spikes: list[fx.Node] = field(default_factory=list)
    reset: str | None = None  # subtract / zero / none; None: no reset node found (yet)
    reset_value: torch.Tensor = field(default_factory=lambda: torch.tensor(0.0))
    v_post: fx.Node | None = None
    owned: set = field(default_factory=set)  # nodes of this step that the replacement removes
    charge: _Charge | None = None
    problem: _Fail | None = None
    #: the spike tests the stored membrane (the previous step's), not the charged one
    #: (:func:`_match_stored_step`)
    stored: bool = False
    #: the spike of the previous step that resets this one's charge (:func:`_match_carried_spike_step`)
    carried_spike: object = None
    #: a zero reset by a carried spike: of the charged value ("total") or of the stored membrane
    #: before the charge ("membrane"), NeuronSpec.zero_scope
    zero_scope: str = "total"


def _charges(h: fx.Node, consts: _Consts) -> list[_Charge]:
    """The ways ``h`` reads as ``decay * v_prev + drive``."""
    if h.op != "call_function" or h.target is not aten.add.Tensor or len(h.args) != 2 or h.kwargs.get("alpha", 1) != 1:
        return []
    out = _sj_charges(h, consts)
    for a, b in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        if not _is_node(b):
            continue
        if _is_node(a) and a.target is aten.mul.Tensor and len(a.args) == 2:
            for p, q in ((a.args[0], a.args[1]), (a.args[1], a.args[0])):
                beta = consts.value(q)
                if beta is not None and _is_node(p):
                    out.append(_Charge(p, beta, b, a))
        if isinstance(a, (int, float)) and not isinstance(a, bool):
            out.append(_Charge(a, None, b, None))  # step 0 of ``v = 0.; v = beta * v + d``
        elif _is_node(a):
            out.append(_Charge(a, None, b, None))  # ``v + d`` (decay 1) or a constant first value
    return out


def _same_v(a, b, consts: _Consts) -> bool:
    """The same node, or equal constants."""
    if a is b:
        return True
    ca, cb = consts.value(a), consts.value(b)
    return ca is not None and cb is not None and _same(ca, cb)


def _strip_rest(w, v, consts):
    """``w`` is ``v`` (rest 0) or ``v - v_rest``: (v_rest, nodes) or (None, [])."""
    if _same_v(w, v, consts):
        return torch.tensor(0.0), []
    if _is_node(w) and w.target is aten.sub.Tensor and w.kwargs.get("alpha", 1) == 1 and _same_v(w.args[0], v, consts):
        rest = consts.value(w.args[1])
        if rest is not None:
            return rest, [w]
    return None, []


def _scaled(n):
    """``inner / k`` or ``inner * k``: [(inner, k, "div"|"mul")]."""
    if not _is_node(n) or len(n.args) != 2:
        return []
    if n.target is aten.div.Tensor:
        return [(n.args[0], n.args[1], "div")]
    if n.target is aten.mul.Tensor:
        return [(n.args[0], n.args[1], "mul"), (n.args[1], n.args[0], "mul")]
    return []


def _sj_charges(h: fx.Node, consts: _Consts) -> list[_Charge]:
    """SpikingJelly's charge forms (NeuronSpec ``charge="sj_*"``), as users write them by hand:
    ``v + (x - (v - v_rest)) / tau`` and ``v - (v - v_rest) / tau + x`` (``* inv_tau`` variants)."""
    out = []
    if len(h.args) != 2:
        return out
    for v, scaled in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        for inner, k, how in _scaled(scaled):
            kv = consts.value(k)
            if kv is None or not _is_node(inner) or inner.target is not aten.sub.Tensor or not _is_node(inner.args[0]):
                continue
            rest, wnodes = _strip_rest(inner.args[1], v, consts)
            if rest is None or consts.value(inner.args[0]) is not None:
                continue
            form, key = ("sj_decay_input", "tau") if how == "div" else ("sj_decay_input_mul", "inv_tau")
            out.append(_Charge(v, None, inner.args[0], None, form, {key: kv, "v_rest": rest}, [scaled, inner] + wnodes))
    for a, d in ((h.args[0], h.args[1]), (h.args[1], h.args[0])):
        if not (_is_node(a) and _is_node(d) and a.target is aten.sub.Tensor and len(a.args) == 2):
            continue
        v, leak = a.args
        for w, k, how in _scaled(leak):
            kv = consts.value(k)
            rest, wnodes = _strip_rest(w, v, consts) if kv is not None else (None, [])
            if rest is None or consts.value(d) is not None:
                continue
            form, key = ("sj_no_decay_input", "tau") if how == "div" else ("sj_no_decay_input_mul", "inv_tau")
            out.append(_Charge(v, None, d, None, form, {key: kv, "v_rest": rest}, [a, leak] + wnodes))
    return out


def _split_compare(c: fx.Node, consts: _Consts, constant_ok: bool = False) -> tuple[fx.Node, torch.Tensor, str, set]:
    """(h, threshold, gt/ge, nodes of the test) for a spike test ``h > thr`` in any of its
    spellings; ``constant_ok``: ``h`` may be a constant (a stored membrane's initial value)."""
    owned = {c}
    if c.target is _HEAVISIDE:
        x, values = c.args[0], consts.value(c.args[1])
        if values is None or values.numel() != 1 or float(values) not in (0.0, 1.0):
            raise _Fail(c, "heaviside with values other than 0 or 1 is not a spike test")
        kind, thr = ("gt" if float(values) == 0.0 else "ge"), torch.tensor(0.0)
        if _is_node(c.args[1]):
            owned.add(c.args[1])
    else:
        kind = _CMP[c.target]
        a, b = c.args[0], c.args[1]
        if kind in ("lt", "le"):
            a, b, kind = b, a, {"lt": "gt", "le": "ge"}[kind]
        if not _is_node(a):
            raise _Fail(c, "the comparison tests a constant against a value (spikes below a threshold?)")
        thr = consts.value(b)
        if thr is None:
            raise _Fail(c, "the threshold is not a constant (it depends on the input or on time)")
        x = a
    if _is_node(x) and x.target is aten.sub.Tensor and bool(torch.all(thr == 0)) and x.kwargs.get("alpha", 1) == 1:
        theta = consts.value(x.args[1])
        if theta is not None and _is_node(x.args[0]) and len(_users(x)) == 1:
            owned.add(x)
            return x.args[0], theta, kind, owned
    if consts.value(x) is not None and not constant_ok:
        raise _Fail(c, "the comparison is between constants")
    return x, thr, kind, owned


def _spikes_of(c: fx.Node, h: fx.Node, consts: "_Consts") -> list[fx.Node]:
    """The float 0/1 spike tensors made from comparison ``c`` of ``h`` (casts and aliases);
    a ``where(c, 0, h)`` zero reset that reads ``c`` directly is left to :func:`_find_reset`."""
    if c.target is _HEAVISIDE:
        spikes = [c]
    else:
        spikes = []
        for u in _users(c):
            if _zeroes_where(u, h, {c}, consts):
                continue
            if _uses_bool_spike(u, c, consts):  # spk * thr, torch.stack of the bool spikes: the test is the spike
                if c not in spikes:
                    spikes.insert(0, c)
                continue
            cast = (
                (u.target is aten.to.dtype and u.args[0] is c and u.args[1] == torch.float32)
                or (u.target is aten._to_copy.default and u.args[0] is c and u.kwargs.get("dtype") == torch.float32)
                or (u.target is aten.type_as.default and u.args[0] is c and u.args[1].meta.get("val") is not None
                    and u.args[1].meta["val"].dtype == torch.float32)
                or (u.target in (aten.where.Scalar, aten.where.self) and u.args[0] is c and u.args[1:] in ((1.0, 0.0), (1, 0)))
            )
            if not cast:
                raise _Fail(u, f"the spike test {c.name} is used directly (not as a float 0/1 spike) by {u.name} ({u.target})")
            spikes.append(u)
    frontier = list(spikes)
    while frontier:
        n = frontier.pop()
        for u in _users(n):
            if u.target in _ALIASES or (u.target is aten.to.dtype and u.args[1] == torch.float32) or (
                    u.target is aten._to_copy.default and u.kwargs.get("dtype") in (None, torch.float32) and len(u.kwargs) <= 1):
                if u not in spikes:
                    spikes.append(u)
                    frontier.append(u)
    return spikes


def _uses_bool_spike(u: fx.Node, c: fx.Node, consts: "_Consts") -> bool:
    """``u`` reads the bool spike test ``c`` as a number (``spk * thr``) or records it
    (``torch.stack`` / ``torch.cat`` of the steps' spikes), as snnTorch tutorial 2 does."""
    if u.target is aten.mul.Tensor and len(u.args) == 2 and c in u.args:
        return consts.value(u.args[1] if u.args[0] is c else u.args[0]) is not None
    return u.target in (aten.stack.default, aten.cat.default) and c in u.args[0]


_WHERE = {aten.where.self, aten.where.ScalarSelf}
#: a bool mask of the spikes: ``s > 0``, ``s != 0``, ``s == 1``, ``s.bool()``
_MASKS = {aten.gt.Scalar: 0, aten.ne.Scalar: 0, aten.eq.Scalar: 1}


def _zeroes_where(u: fx.Node, h: fx.Node, masks: set, consts: "_Consts") -> bool:
    """``u`` is ``where(mask, 0, h)`` or ``h.masked_fill(mask, 0)`` with ``mask`` in ``masks``."""
    if u.target in _WHERE and len(u.args) == 3 and u.args[0] in masks and u.args[2] is h:
        zero = u.args[1]
    elif u.target is aten.masked_fill.Scalar and len(u.args) == 3 and u.args[0] is h and u.args[1] in masks:
        zero = u.args[2]
    elif (u.target is aten.index_put.default and len(u.args) == 3 and _is_copy_of(u.args[0], h) and len(u.args[1]) == 1
          and u.args[1][0] in masks):  # h[mask] = 0, on h or on h.clone()
        zero = u.args[2]
    else:
        return False
    value = consts.value(zero)
    return value is not None and bool(torch.all(value == 0))


def _is_copy_of(x, h: fx.Node) -> bool:
    """``x`` is ``h`` or a clone of it read by nothing else."""
    return x is h or (_is_node(x) and x.target is aten.clone.default and x.args[0] is h and len(_users(x)) == 1)


def _spike_masks(step: "_Step") -> set:
    """The bool tensors that are true where the step spiked: its comparison (or the same
    comparison written again), and masks of its spikes."""
    c = step.compare
    masks = {c} if c.target is not _HEAVISIDE else set()
    masks |= {u for u in _users(c.args[0]) if u is not c and u.target is c.target and u.args[1:] == c.args[1:] and not u.kwargs}
    for s in step.spikes:
        for u in _users(s):
            if (u.target in _MASKS and u.args[0] is s and u.args[1] == _MASKS[u.target]) or (
                    u.target in (aten.to.dtype, aten._to_copy.default) and u.args[0] is s
                    and (u.args[1:2] == (torch.bool,) or u.kwargs.get("dtype") is torch.bool)):
                masks.add(u)
    return masks


def _find_reset(step: _Step, consts: _Consts) -> None:
    """Find how ``h`` is reset by the step's spikes; sets reset, v_post, owned."""
    h, spikes = step.h, set(step.spikes)
    masks = _spike_masks(step)
    copies = [c for c in _users(h) if _is_copy_of(c, h)]
    for u in _users(h) + [cu for c in copies for cu in _users(c)]:
        if u in step.owned:
            continue
        # zero: where(mask, 0, h) or h.masked_fill(mask, 0); equal to s * 0 + (1 - s) * h but
        # for the sign of a zero membrane (never a spike)
        if _zeroes_where(u, h, masks, consts):
            mask, zero = (u.args[0], u.args[1]) if u.target in _WHERE else (u.args[1], u.args[2])
            mask = mask[0] if isinstance(mask, (list, tuple)) else mask  # index_put's [mask]
            step.reset, step.v_post = "zero", u
            step.owned |= {u} | ({mask} if mask is not step.compare and len(_users(mask)) == 1 else set())
            if u.args[0] is not h:  # the clone the reset wrote into
                step.owned.add(u.args[0])
            if _is_node(zero) and zero.target in _FILLS and len(_users(zero)) == 1:  # zeros_like(h): reads h's shape only
                step.owned.add(zero)
            return
        # subtract: h - s * thr   (or h - s when thr == 1)
        if u.target is aten.sub.Tensor and u.args[0] is h and u.kwargs.get("alpha", 1) == 1 and _is_node(u.args[1]):
            m = u.args[1]
            if m in spikes:
                amount = torch.tensor(1.0)
                parts = {u}
            elif m.target is aten.mul.Tensor and len(_users(m)) == 1 and any(a in spikes for a in m.args):
                other = m.args[1] if m.args[0] in spikes else m.args[0]
                amount = consts.value(other)
                if amount is None:
                    raise _Fail(m, "the reset subtracts a value that is not a constant")
                parts = {u, m}
            elif m.target is aten.mul.Tensor and len(_users(m)) == 1 and set(m.args) & spikes and h in m.args:
                amount, parts = None, {u, m}  # h - h * s: zero reset
                step.reset, step.v_post = "zero", u
                step.owned |= parts
                return
            else:
                continue
            if not _same(amount, step.threshold):
                raise _Fail(u, f"the subtract reset removes {amount.flatten()[:4].tolist()}, not the threshold "
                               f"{step.threshold.flatten()[:4].tolist()} (NeuronSpec subtracts the threshold)")
            step.reset, step.v_post = "subtract", u
            step.owned |= parts
            return
        # zero: h * (1 - s)
        if u.target is aten.mul.Tensor and h in u.args:
            r = u.args[1] if u.args[0] is h else u.args[0]
            if _one_minus(r) in spikes or (
                _is_node(r) and len(_users(r)) == 1 and r.target is aten.sub.Tensor and r.args[1] in spikes
                and consts.value(r.args[0]) is not None and bool(torch.all(consts.value(r.args[0]) == 1))
            ):
                step.reset, step.v_post = "zero", u
                step.owned |= {u, r}
                return


def _match_step(c: fx.Node, consts: _Consts) -> _Step:
    h, thr, kind, owned = _split_compare(c, consts)
    if _reset_inside_charge(h, consts) is not None:  # (v * decay) * (1 - s) + x: _match_carried_spike_step's
        raise _Fail(h, f"{h.name} resets the stored membrane by the previous step's spike before the charge")
    charges = _charges(h, consts)
    if not charges:
        raise _Fail(h, f"the value tested against the threshold ({h.target}) is not a charge 'decay * v + input'"
                       + _hint(h))
    step = _Step(h=h, charges=charges, compare=c, threshold=thr, cmp=kind, owned=owned | {h})
    step.spikes = _spikes_of(c, h, consts)
    step.owned |= set(step.spikes)
    _find_reset(step, consts)
    return step


def _match_stored_step(c: fx.Node, consts: _Consts) -> _Step:
    """A spike test of the stored membrane, snnTorch tutorial 2's hand-written LIF::

        s = v > thr                    # the membrane the previous step stored
        v = decay * v + d - s * thr    # charge, then the reset by that spike (or a zero reset)

    the spec's ``reset_timing="previous_step"`` with ``spike_from="stored"``.  Step 0 may
    test a constant initial membrane."""
    v, thr, kind, owned = _split_compare(c, consts, constant_ok=True)
    if not _is_node(v):
        raise _Fail(c, "the spike test does not read a membrane")
    near = _users(v) + [w for u in _users(v) for w in _users(u)]  # the charge, or its decay * v
    found = [(h, ch) for h in dict.fromkeys(near) for ch in _charges(h, consts) if ch.v_prev is v]
    if len(found) != 1:
        raise _Fail(c, f"the tested value {v.name} is not charged once as 'decay * v + input'" + _hint(v))
    h, charge = found[0]
    step = _Step(h=h, charges=[charge], compare=c, threshold=thr, cmp=kind, owned=owned | {h}, stored=True)
    step.spikes = _spikes_of(c, h, consts)
    step.owned |= set(step.spikes)
    _find_reset(step, consts)
    if step.reset is None:
        raise _Fail(h, f"the charge {h.name} of the tested membrane is not reset by the spike of {c.name}")
    order = {n: i for i, n in enumerate(c.graph.nodes)}
    early = [u for sp in step.spikes for u in _users(sp) if u not in step.owned and order[u] < order[h]]
    if early:  # the spike belongs to the step before this charge: not the stored-membrane form
        raise _Fail(early[0], f"{early[0].name} reads the spikes of {c.name} before the membrane update they reset")
    return step


def _match_carried_spike_step(c: fx.Node, consts: _Consts) -> _Step:
    """A spike test of the membrane after a reset by the previous step's spike (snnTorch's own
    order, written by hand)::

        v = decay * v + d - s * thr    # (or (decay * v + d) * (1 - s)); s from the last step
        s = v > thr

    the spec's ``reset_timing="previous_step"``: its reset test ``H(v_{t-1} - thr)`` is the
    spike carried from step t-1.  Step 0's carried spike must be the constant 0.

    The zero reset may also come before the charge, on the stored membrane (STBP, Wu et al.
    2018: ``mem = mem * decay * (1 - spike) + x``; spec ``zero_scope="membrane"``, whose
    ``decay * ((1 - s) * v)`` has the same bits as ``(v * decay) * (1 - s)`` for s in {0, 1})."""
    v, thr, kind, owned = _split_compare(c, consts)
    inside = _reset_inside_charge(v, consts)
    if inside is not None:
        charge, carried = inside
        step = _Step(h=v, charges=[charge], compare=c, threshold=thr, cmp=kind, owned=owned | {v} | set(charge.nodes()),
                     reset="zero", v_post=v, carried_spike=_initial_spikes(carried, v, consts), zero_scope="membrane")
        step.spikes = _spikes_of(c, v, consts)
        step.owned |= set(step.spikes)
        return step
    reset = _carried_spike_reset(v, thr, consts)
    if reset is None:
        raise _Fail(v, f"{v.name} is not a charge reset by the previous step's spike")
    h, how, carried, parts = reset
    carried = _initial_spikes(carried, v, consts)
    charges = _charges(h, consts)
    if not charges:
        raise _Fail(h, f"the value reset by the previous spike ({h.target}) is not a charge 'decay * v + input'" + _hint(h))
    step = _Step(h=h, charges=charges, compare=c, threshold=thr, cmp=kind, owned=owned | {h, v} | parts,
                 reset=how, v_post=v, carried_spike=carried)
    step.spikes = _spikes_of(c, v, consts)
    step.owned |= set(step.spikes)
    return step


def _initial_spikes(carried, v: fx.Node, consts: _Consts):
    """The carried spike, or 0.0 at step 0, where it is a constant (which must be 0)."""
    zero = consts.value(carried)
    if zero is None:
        return carried
    if not bool(torch.all(zero == 0)):
        raise _Fail(v, "the first step is reset by constant spikes that are not 0")
    return 0.0


def _reset_inside_charge(v: fx.Node, consts: _Consts) -> tuple[_Charge, object] | None:
    """``(charge, carried spike)`` when ``v`` is ``(v_prev * decay) * (1 - s) + x`` (factors in
    either order, ``decay`` a constant): a zero reset of the stored membrane by the previous
    step's spike ``s``, then the charge; else None.  (Without a decay, ``v_prev * (1 - s) + x``
    is also the same-step zero reset of the step before, the reading :func:`_match_step` takes.)"""
    if v.target is not aten.add.Tensor or len(v.args) != 2 or v.kwargs.get("alpha", 1) != 1:
        return None
    for kept, drive in (v.args, v.args[::-1]):
        if not (_is_node(kept) and _is_node(drive) and kept.target is aten.mul.Tensor and len(kept.args) == 2 and len(_users(kept)) == 1):
            continue
        for decayed, r in (kept.args, kept.args[::-1]):
            spike = _one_minus(r)
            if not (spike is not None and _is_node(decayed) and decayed.target is aten.mul.Tensor and len(decayed.args) == 2
                    and len(_users(decayed)) == 1):
                continue
            for v_prev, factor in (decayed.args, decayed.args[::-1]):
                decay = consts.value(factor)
                if decay is not None and (_is_node(v_prev) or isinstance(v_prev, (int, float))):
                    return _Charge(v_prev, decay, drive, kept, extra=[decayed, r]), spike
    return None


def _carried_spike_reset(v: fx.Node, thr: torch.Tensor, consts: _Consts):
    """``(h, reset, carried spike, reset nodes)`` when ``v`` is ``h - s * thr`` (``h - s`` for a
    threshold of 1) or ``h * (1 - s)`` with ``s`` a spike or a constant 0; else None."""
    if v.target is aten.sub.Tensor and v.kwargs.get("alpha", 1) == 1 and _is_node(v.args[0]) and _is_node(v.args[1]):
        h, m = v.args
        if m.target is aten.mul.Tensor and len(_users(m)) == 1:
            amounts = [(a, consts.value(b)) for a, b in (m.args, m.args[::-1]) if _is_node(a)]
            for s, amount in amounts:
                if amount is not None and _same(amount, thr):
                    return h, "subtract", s, {m}
        if bool(torch.all(thr == 1)):
            return h, "subtract", m, set()
    if v.target is aten.mul.Tensor and len(v.args) == 2:
        for h, r in (v.args, v.args[::-1]):
            spike = _one_minus(r)
            if _is_node(h) and spike is not None:
                return h, "zero", spike, {r}
    return None


def _one_minus(r) -> fx.Node | None:
    """``s`` when ``r`` is ``1 - s`` (``rsub(s, 1)``) that only one node reads; else None."""
    if (_is_node(r) and r.target is aten.rsub.Scalar and r.args[1] == 1 and r.kwargs.get("alpha", 1) == 1
            and len(_users(r)) == 1 and _is_node(r.args[0])):
        return r.args[0]
    return None


def _hint(h: fx.Node) -> str:
    return ("; recognised charges: 'decay * v + x', 'v + (x - (v - v_rest)) / tau', 'v - (v - v_rest) / tau + x' "
            "(or '* inv_tau'), with x not depending on v")


# ------------------------------------------------------------------ sites


@dataclass(eq=False)
class HandwrittenSite:
    """A recognised recurrence: its steps, in order, and the spec."""

    rule: str
    steps: list[_Step]
    spec: NeuronSpec
    v_init: object  # fx.Node passed in as the initial state, or None (spec.v_init)
    name: str = ""


class HandwrittenNeuron(torch.nn.Module):
    """Stands for one hand-written neuron layer (no module of the user's model).

    ``forward(spikes)`` returns its argument: :class:`HandwrittenOriginal` calls it once
    per step with the spikes recorded from the original eager run, so the per-layer
    parity hooks of :mod:`psu_export.verify` see the original's spikes.
    """

    def __init__(self, rule: str, description: str, sequence: bool = False):
        super().__init__()
        self.rule = rule
        self.description = description
        #: the neuron runs its own loop over the whole sequence (:func:`_as_sequence_calls`)
        self.sequence = sequence

    def forward(self, spikes):
        return spikes

    def extra_repr(self) -> str:
        return f"{self.rule}: {self.description}"


class HandwrittenConverter(FrameworkConverter):
    """Converter of the recognised recurrences (not in the registry: it matches no class)."""

    name = "handwritten"
    import_name = "torch"
    version_range = ">=2.5"

    def neuron_classes(self):
        return ()

    def to_spec(self, module):  # the spec comes from the pattern match
        raise NotImplementedError

    def call_convention(self, module) -> CallConvention:
        return CallConvention(state_roles=("membrane",), forward=lambda call: module.forward, sequence=module.sequence)

    def consumes_sequence(self, module) -> bool:
        return module.sequence

    def initial_state(self, module, role, value, step_input):
        return value


CONVERTER = HandwrittenConverter()


def _depends_on(node: fx.Node, target: fx.Node, pos: dict) -> bool:
    """Whether ``node`` is computed from ``target`` (walking inputs back to ``target``'s position)."""
    seen, work = set(), [node]
    while work:
        n = work.pop()
        if n is target:
            return True
        if n in seen or pos.get(n, -1) <= pos[target]:
            continue
        seen.add(n)
        work.extend(n.all_input_nodes)
    return False


def _chains(steps: list[_Step], carried, pos: dict, fails: list) -> list[list[_Step]]:
    """Link steps whose charge reads the previous step's carried value into chains."""
    by_carried = {carried(s): s for s in steps if carried(s) is not None}
    nxt, has_prev = {}, set()
    for s in steps:
        linked = [ch for ch in s.charges if _is_node(ch.v_prev) and ch.v_prev in by_carried and by_carried[ch.v_prev] is not s]
        clean = [ch for ch in linked if not _depends_on(ch.drive, ch.v_prev, pos)]
        if linked and not clean:
            fails.append(_Fail(s.h, f"the input term {linked[0].drive.name} of the charge depends on the membrane "
                                    f"{linked[0].v_prev.name}: not 'decay * v + input'" + _hint(s.h)))
            continue
        if clean:
            s.charge = next((ch for ch in clean if ch.decay is not None or ch.form != "leaky"), clean[0])
            prev = by_carried[s.charge.v_prev]
            if prev in nxt:
                continue  # two readers of one carried value: not a single recurrence
            nxt[prev] = s
            has_prev.add(id(s))
    chains = []
    for s in steps:
        if id(s) in has_prev:
            continue
        chain = [s]
        while chain[-1] in nxt:
            chain.append(nxt[chain[-1]])
        if len(chain) > 1:
            chains.append(chain)
        elif s.compare is not None and not any(f.node is s.h for f in fails):
            fails.append(_Fail(s.h, f"the spike test {s.compare.name} reads {s.h.name}, which is not 'decay * v + input' "
                                    "with v the previous step's membrane (recurrent spike feedback, an extra term in the "
                                    "charge, or another charge form)" + _hint(s.h)))
    return chains


def _first_charge(first: _Step, second: _Step, consts: _Consts) -> tuple[_Charge, object, torch.Tensor]:
    """Step 0's charge and initial state: (charge, state node or None, v_init value)."""
    decay = second.charge.decay
    best = None
    if second.charge.form != "leaky":
        for ch in first.charges:
            if ch.same_law(second.charge):
                v0 = consts.value(ch.v_prev)
                return (ch, None, v0) if v0 is not None else (ch, ch.v_prev, None)
        raise _Fail(first.h, f"step 0's charge does not have the form of the later steps' ({second.charge.form})")
    for ch in first.charges:
        if ch.form != "leaky":
            continue
        if decay is not None and ch.decay is not None and not _same(ch.decay, decay):
            continue
        v0 = consts.value(ch.v_prev)
        if v0 is not None:
            if ch.decay is None and ch.mul is None and decay is not None:
                # ``v = 0.`` folded away: step 0 is ``d + 0.0``; exact only for v_init == 0
                if not bool(torch.all(v0 == 0)):
                    continue
            return ch, None, v0
        if ch.mul is not None or decay is None:
            best = best or (ch, ch.v_prev, None)
    if best is None:
        raise _Fail(first.h, "step 0's charge does not have the form of the later steps' (decay * v + input)")
    ch, node, _ = best
    # reset written before the charge: step 0 resets the initial state with the initial spikes
    return ch, node, None


def _spec_of(rule: str, chain: list[_Step], v_init) -> NeuronSpec:
    later = chain[1:]
    law = later[0].charge
    for s in later:
        if not s.charge.same_law(law):
            raise _Fail(s.h, "the charge (decay, tau or rest potential) differs between time steps")
    decay = torch.tensor(1.0) if law.decay is None else law.decay
    extra = {}
    if law.form != "leaky":
        extra = dict(law.params, charge=law.form)
        decay = 1.0 - (1.0 / law.params["tau"] if "tau" in law.params else law.params["inv_tau"])
    if rule == "integrator":
        return NeuronSpec(decay=decay, threshold=torch.tensor(NEVER_FIRES), reset="none", reset_timing="same_step", compare="gt", v_init=v_init, **extra)
    first = chain[0]
    for s in chain:
        if not _same(s.threshold, first.threshold) or s.cmp != first.cmp:
            raise _Fail(s.compare, "the threshold or comparison differs between time steps")
    resets = {s.reset for s in chain[:-1]}
    if len(resets) != 1:
        raise _Fail(chain[0].h, f"the reset differs between time steps ({sorted(map(str, resets))})")
    reset = resets.pop() or "none"
    if chain[-1].reset not in (None, reset):
        raise _Fail(chain[-1].h, "the last step resets differently")
    if len({s.stored for s in chain}) != 1 or len({s.carried_spike is None for s in chain}) != 1:
        raise _Fail(chain[0].compare, "the steps test different membranes (stored, charged, reset by the previous spike)")
    if first.carried_spike is not None:
        _check_carried_spikes(chain, v_init)
        if len({s.zero_scope for s in chain}) != 1:
            raise _Fail(chain[0].h, "the zero reset acts on the stored membrane in some steps and on the charged one in others")
        return NeuronSpec(decay=decay, threshold=first.threshold, reset=reset, reset_timing="previous_step", compare=first.cmp,
                          zero_scope=first.zero_scope, v_init=v_init)
    if first.stored:  # u = C(v, d); subtract: u - s * thr; zero: u - u * s (or u * (1 - s))
        if law.form != "leaky":
            raise _Fail(first.h, f"a spike test of the stored membrane is only supported with the charge 'decay * v + input' (not {law.form})")
        return NeuronSpec(decay=decay, threshold=first.threshold, reset=reset, reset_timing="previous_step", compare=first.cmp,
                          zero_scope="total", v_init=v_init, spike_from="stored")
    # a zero reset written by hand removes the membrane where it fired (v * (1 - s), torch.where, ...): nothing is added
    return NeuronSpec(decay=decay, threshold=first.threshold, reset=reset, reset_timing="same_step", compare=first.cmp,
                      reset_value=torch.tensor(0.0), v_init=v_init, reset_form="product" if reset == "zero" else "standard", **extra)


def _check_carried_spikes(chain: list[_Step], v_init: torch.Tensor) -> None:
    """Each step is reset by the spikes of the step before; step 0 by constant zeros, which is
    the spec's reset test of the initial membrane only if that does not fire."""
    for prev, step in zip(chain, chain[1:]):
        if step.carried_spike not in prev.spikes:
            raise _Fail(step.v_post, f"{step.v_post.name} is reset by {getattr(step.carried_spike, 'name', step.carried_spike)}, "
                                     f"not by the spikes of the previous step ({prev.compare.name})")
    first = chain[0]
    if _is_node(first.carried_spike) or first.carried_spike != 0.0:
        raise _Fail(first.v_post, "step 0 is not reset by constant zero spikes")
    fires = v_init > first.threshold if first.cmp == "gt" else v_init >= first.threshold
    if bool(torch.any(fires)):
        raise _Fail(first.v_post, "the initial membrane is above the threshold, but step 0 is reset by zero spikes")


def _carried_lif(s: _Step):
    return s.v_post if s.v_post is not None else s.h


def _site_name(rule: str, index: int, step: _Step) -> str:
    where = module_path(step.charge.drive) if step.charge else step.h.name
    prefix = "lif" if rule == "lif" else "integrator"
    return f"{prefix}{index}@{where}"


def _check_escapes(site: HandwrittenSite) -> None:
    """Only spikes and the post-reset membrane may be used outside the neuron."""
    owned = _all_owned(site)
    allowed = set()
    for s in site.steps:
        allowed |= set(s.spikes)
        if site.rule == "lif" and s.v_post is None and site.spec.reset != "none":
            continue  # last step of a reset written before the charge: h is the pre-reset membrane
        allowed.add(_carried_lif(s) if site.rule == "lif" else s.h)
    for s in site.steps:
        for n in s.owned:
            if n in allowed:
                continue
            for u in _users(n):
                if u not in owned:
                    what = "the membrane before its reset" if n is s.h else f"an intermediate value of the neuron ({n.name})"
                    raise _Fail(u, f"{u.name} uses {what}; only the spikes and the post-reset membrane can be read "
                                   "from an exactly converted neuron")


# ------------------------------------------------------------------ the pass


def _dedupe(fails: list) -> dict[str, str]:
    """One reason per kind of failure (the first node), noting how many steps repeat it."""
    import re

    out, seen = {}, {}
    for f in fails:
        key = re.sub(r"\b[a-z_]+_\d+\b|\b(add|sub|mul|div|gt|ge|lt|le|heaviside|to|linear|conv2d)\b", "#", f.why)
        if key in seen:
            seen[key][1] += 1
            continue
        name = f"node {f.node.name}" if _is_node(f.node) else "model"
        seen[key] = [name, 0]
        out[name] = f.why
    for name, count in seen.values():
        if count:
            out[name] += f" (and {count} more like it, one per time step)"
    return out


def _match_lif(gm, consts, fails) -> list[HandwrittenSite]:
    """The LIF sites, reading a spike test that is not of a charge as a test of the stored
    membrane or as one after the previous spike's reset, whichever explains more steps
    (each can also read the other's graph, shifted by a step, but then leaves steps over)."""
    best = None
    for other_form in (_match_stored_step, _match_carried_spike_step):
        tried: list[_Fail] = []
        sites = _match_lif_with(gm, consts, tried, other_form)
        explained = sum(len(s.steps) for s in sites) if len({len(s.steps) for s in sites}) <= 1 else -1
        if best is None or explained > best[0]:
            best = (explained, sites, tried)
    fails += best[2]
    return best[1]


def _match_lif_with(gm, consts, fails, other_form) -> list[HandwrittenSite]:
    steps, failed = [], []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in _COMPARE_TARGETS:
            try:
                steps.append(_match_step(n, consts))
            except _Fail as exc:
                try:
                    steps.append(other_form(n, consts))
                except _Fail:
                    failed.append((n, exc))
    # a step's spike mask (s > 0, or its comparison written again for the reset) is no spike test
    masks = {n for s in steps for n in s.owned if n is not s.compare}
    steps = [s for s in steps if s.compare not in masks]
    fails += [exc for n, exc in failed if n not in masks]
    sites = []
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    for chain in _chains(steps, _carried_lif, pos, fails):
        try:
            ch0, node0, v0 = _first_charge(chain[0], chain[1], consts)
            chain[0].charge = ch0
            if node0 is not None and node0.target in (aten.sub.Tensor, aten.mul.Tensor):
                # reset written before the charge: step 0 resets the initial state with zero spikes
                folded = _fold_initial_reset(node0, chain[0].threshold, consts)
                if folded is not None:
                    node0, v0 = folded
            spec = _spec_of("lif", chain, v0 if v0 is not None else torch.tensor(0.0))
            site = HandwrittenSite("lif", chain, spec, node0)
            _check_escapes(site)
            sites.append(site)
        except _Fail as exc:
            fails.append(exc)
    return sites


def _fold_initial_reset(node: fx.Node, theta, consts):
    """``v0 - s0 * thr`` / ``v0 * (1 - s0)`` with constant zero spikes ``s0``: (state node or None, v_init)."""
    for a in node.args:
        if _is_node(a) and a.target in (aten.mul.Tensor, aten.rsub.Scalar):
            inner = [consts.value(b) for b in a.args]
            if all(v is not None for v in inner):
                other = node.args[0] if node.args[1] is a else node.args[1]
                if _is_node(other) and (a.target is aten.mul.Tensor and bool(torch.all(consts.value(a) == 0))
                                        or a.target is aten.rsub.Scalar and bool(torch.all(consts.value(a) == 1))):
                    return other, None
    return None


def _match_integrators(gm, consts, taken: set, period: int | None, steps_n: int | None, fails) -> list[HandwrittenSite]:
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    steps = []
    for n in gm.graph.nodes:
        if n in taken or n.op != "call_function" or n.target is not aten.add.Tensor:
            continue
        charges = [ch for ch in _charges(n, consts) if not set(ch.nodes()) & taken]
        if charges:
            steps.append(_Step(h=n, charges=charges, owned={n}))
    sites = []
    for chain in _chains(steps, lambda s: s.h, pos, []):
        gaps = {pos[b.h] - pos[a.h] for a, b in zip(chain, chain[1:])}
        if len(chain) != steps_n or gaps != {period}:
            continue  # not a recurrence over the time loop
        if all(s.charge.form == "leaky" and s.charge.decay is None and s.charge.mul is None for s in chain[1:]):
            continue  # a plain running sum (acc = acc + d): the re-roll makes it one cumulative sum
        try:
            ch0, node0, v0 = _first_charge(chain[0], chain[1], consts)
            chain[0].charge = ch0
            spec = _spec_of("integrator", chain, v0 if v0 is not None else torch.tensor(0.0))
            site = HandwrittenSite("integrator", chain, spec, node0)
            _check_escapes(site)
            sites.append(site)
        except _Fail as exc:
            fails.append(exc)
    return sites


def _replace(gm: fx.GraphModule, site: HandwrittenSite, index: int, renamed: dict) -> None:
    """Each step becomes ``call = psu_capture.neuron(drive, states, index, 2)``; its nodes are removed."""
    graph = gm.graph
    doomed = _all_owned(site)
    keep = lambda u: u not in doomed and u.target not in METADATA_ASSERTS  # noqa: E731  (a removed node's dtype checks go with it)

    def now(n):
        while n in renamed:
            n = renamed[n]
        return n

    prev_membrane = None
    for k, step in enumerate(site.steps):
        with graph.inserting_before(step.h):
            states = ([] if site.v_init is None else [now(site.v_init)]) if k == 0 else [prev_membrane]
            call = graph.call_function(OPAQUE_NEURON, (now(step.charge.drive), states, index, 2))
            spikes = graph.call_function(operator.getitem, (call, 0))
            membrane = graph.call_function(operator.getitem, (call, 1))
        for s in step.spikes:
            value = spikes
            if s.meta.get("val") is not None and s.meta["val"].dtype == torch.bool:  # a bool spike test read as is
                with graph.inserting_after(spikes):
                    value = graph.call_function(aten.ne.Scalar, (spikes, 0))
            s.replace_all_uses_with(value, delete_user_cb=keep)
            renamed[s] = value
        carried = _carried_lif(step) if site.rule == "lif" else step.h
        carried.replace_all_uses_with(membrane, delete_user_cb=keep)
        renamed[carried] = membrane
        prev_membrane = membrane
    gone: set = set()
    for n in reversed(list(graph.nodes)):
        if n in doomed and n not in gone:
            for u in list(n.users):
                if u.target in METADATA_ASSERTS:
                    graph.erase_node(u)
            if n.users:
                raise _Fail(next(iter(n.users)), f"still uses {n.name} after the replacement")
            _erase_dead(graph, n, gone)


_IMPURE = {OPAQUE_NEURON, operator.getitem}


def _erase_dead(graph: fx.Graph, node: fx.Node, gone: set) -> None:
    """Erase ``node`` and then every pure input that no longer has a user."""
    work = [node]
    while work:
        n = work.pop()
        if n in gone or n.users or n.op != "call_function":
            continue
        if n is not node and (n.target in _IMPURE or n.target in METADATA_ASSERTS or str(n.target).endswith("_") or
                              getattr(n.target, "_schema", None) is not None and n.target._schema.is_mutable):
            continue
        inputs = list(n.all_input_nodes)
        graph.erase_node(n)
        gone.add(n)
        work.extend(inputs)


def _all_owned(site: HandwrittenSite) -> set:
    owned = set()
    for s in site.steps:
        owned |= s.owned
        if s.charge is not None:
            owned |= set(s.charge.nodes())
    return owned


#: in-place ops of hand-written updates (``mem -= spk * thr``, ``mem *= 1 - spk``,
#: ``mem.masked_fill_(mask, 0)``, ``mem[mask] = 0``) and their out-of-place forms
_OUT_OF_PLACE = {
    aten.add_.Tensor: aten.add.Tensor, aten.sub_.Tensor: aten.sub.Tensor, aten.mul_.Tensor: aten.mul.Tensor,
    aten.div_.Tensor: aten.div.Tensor, aten.add_.Scalar: aten.add.Scalar, aten.sub_.Scalar: aten.sub.Scalar,
    aten.mul_.Scalar: aten.mul.Scalar, aten.div_.Scalar: aten.div.Scalar,
    aten.masked_fill_.Scalar: aten.masked_fill.Scalar, aten.index_put_.default: aten.index_put.default,
}


def _out_of_place(graph: fx.Graph) -> None:
    """Rewrite in-place updates of tensors computed in the graph as out-of-place ones.

    ``y = x.op_(...)`` becomes ``y = op(x, ...)`` and every later reader of ``x`` reads
    ``y``: the same values, and a recurrence the rules can follow from step to step.  A
    tensor with a view (whose readers would see the update through it) is left alone.
    """
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _OUT_OF_PLACE:
            continue
        x = node.args[0]
        if not _is_node(x) or x.op != "call_function" or any(u.target in _VIEWS for u in x.users):
            continue
        after, n = set(), node.next
        while n.op != "root":  # the nodes after the update (fx keeps them in a ring)
            after.add(n)
            n = n.next
        with graph.inserting_after(node):
            functional = graph.call_function(_OUT_OF_PLACE[node.target], node.args, node.kwargs)
        node.replace_all_uses_with(functional)
        for u in list(x.users):
            if u in after and u is not functional:
                u.replace_input_with(x, functional)
        graph.erase_node(node)


def apply_patterns(captured: CapturedGraph) -> list[HandwrittenSite]:
    """Replace every recognised recurrence of ``captured`` by opaque neuron calls (in place)."""
    gm = captured.graph_module
    _out_of_place(gm.graph)
    consts = _Consts(gm)
    fails: list[_Fail] = []
    sites = _match_lif(gm, consts, fails)
    lengths = {len(s.steps) for s in sites}
    if len(lengths) > 1:
        raise NotConvertibleError({s.name or f"lif{i}": f"runs {len(s.steps)} steps" for i, s in enumerate(sites)},
                                  "The hand-written neurons run different numbers of time steps:")
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    period = None
    if sites:
        gaps = {pos[b.h] - pos[a.h] for a, b in zip(sites[0].steps, sites[0].steps[1:])}
        period = gaps.pop() if len(gaps) == 1 else None
    taken = set().union(*(_all_owned(s) for s in sites)) if sites else set()
    if sites:
        sites += _match_integrators(gm, consts, taken, period, lengths.pop(), fails)
    sites.sort(key=lambda s: pos[s.steps[0].h])
    for i, site in enumerate(sites):
        site.name = _site_name(site.rule, i, site.steps[1])
    if not sites:
        reasons = _dedupe(fails)
        raise NotConvertibleError(reasons or {"model": "no neuron module of a supported framework and no hand-written "
                                              "neuron recurrence (decay * v + input, spike test, reset) was found"},
                                  "No neuron layer could be recognised:")
    neurons, renamed = [], {}
    for i, site in enumerate(sites):
        try:
            _replace(gm, site, i, renamed)
        except _Fail as exc:  # the graph is half rewritten: never export it
            raise NotConvertibleError({site.name: str(exc)}) from exc
    sequence = _as_sequence_calls(gm.graph, len(sites))
    for i, site in enumerate(sites):
        module = HandwrittenNeuron(site.rule, _describe(site), sequence)
        neuron = NeuronModule(i, site.name, module, CONVERTER, site.spec, None, CONVERTER.call_convention(module))
        neurons.append(neuron)
    _copy_outputs(gm)
    gm.graph.lint()
    gm.recompile()
    captured.neurons = neurons
    captured.notes.append("hand-written neuron loops recognised: " + "; ".join(f"{s.name} = {_describe(s)}" for s in sites))
    captured.pattern_failures = fails  # type: ignore[attr-defined]
    return sites


def _as_sequence_calls(graph: fx.Graph, n_sites: int) -> bool:
    """Neurons that each loop over the whole sequence themselves, one after the other (TET's
    ``LIFSpike``: ``for t in range(T): mem = mem * tau + x[:, t]; ...``, then ``torch.stack(
    spikes, dim=1)``, between layers that fold time into the batch): each neuron's steps,
    calls on ``select(x, dim, t)`` for t = 0, 1, ... whose spikes only that one stack reads,
    become one call on the whole sequence (time moved to the front), so the model is a chain of
    multi-step neurons with no time loop around them.  True when every neuron is of that kind
    (the graph is then rewritten; otherwise it is left as it is)."""
    calls: dict[int, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_function" and n.target is OPAQUE_NEURON:
            calls.setdefault(n.args[2], []).append(n)
    plans = []
    for index in range(n_sites):
        plan = _whole_sequence_plan(calls.get(index, []))
        if plan is None:
            return False
        plans.append((index, *plan))
    for index, steps, source, dim, stack in plans:
        with graph.inserting_before(steps[0]):
            sequence = graph.call_function(aten.movedim.int, (source, dim, 0))
            call = graph.call_function(OPAQUE_NEURON, (sequence, steps[0].args[1], index, 2))
            spikes = graph.call_function(operator.getitem, (call, 0))
            stacked = graph.call_function(aten.movedim.int, (spikes, 0, dim))
        stack.replace_all_uses_with(stacked)
        graph.erase_node(stack)
        for step in reversed(steps):
            selected = step.args[0]
            for out in list(step.users):
                graph.erase_node(out)
            graph.erase_node(step)
            sliced = selected.args[0]
            graph.erase_node(selected)
            if sliced is not source and not sliced.users:
                graph.erase_node(sliced)
    graph.lint()
    return True


def _whole_sequence_plan(steps: list[fx.Node]):
    """``(steps, x, dim, stack)`` when step t's input is ``select(x, dim, t)``, its membrane only
    feeds step t + 1 and its spikes only ``stack`` (all steps' spikes, in order, along ``dim``)."""
    if len(steps) < 2:
        return None
    inputs = [s.args[0] for s in steps]
    if not all(_is_node(i) and i.target is aten.select.int and len(i.users) == 1 for i in inputs):
        return None

    def seen_through(x):  # x[:, t]: a whole slice of x first
        return _whole_slice_of(x) or x

    source, dim = seen_through(inputs[0].args[0]), inputs[0].args[1]
    if any(seen_through(i.args[0]) is not source or i.args[1] != dim or i.args[2] != t for t, i in enumerate(inputs)):
        return None
    spikes, stacks = [], set()
    for k, step in enumerate(steps):
        outs = {u.args[1]: u for u in step.users if u.target is operator.getitem}
        if len(outs) != len(step.users) or 0 not in outs:
            return None
        if 1 in outs and set(outs[1].users) - ({steps[k + 1]} if k + 1 < len(steps) else set()):
            return None  # the membrane is read outside the neuron
        spikes.append(outs[0])
        stacks |= set(outs[0].users)
    if len(stacks) != 1:
        return None
    stack = stacks.pop()
    stack_dim = stack.args[1] if len(stack.args) > 1 else stack.kwargs.get("dim", 0)
    if stack.target is not aten.stack.default or list(stack.args[0]) != spikes or stack_dim != dim:
        return None
    return steps, source, dim, stack


def _copy_outputs(gm: fx.GraphModule) -> None:
    """Read each loop value the model returns through a ``clone`` after the loop.

    (``return acc`` reads the last step's value directly from the output node; the
    rewrite maps last-step values for suffix nodes, so give it one.)
    """
    out = next(n for n in gm.graph.nodes if n.op == "output")
    mapping = {}
    for a in out.all_input_nodes:
        if a.op == "call_function" and a.target is operator.getitem and a.args[0].target is OPAQUE_NEURON:
            with gm.graph.inserting_before(out):
                mapping[a] = gm.graph.call_function(aten.clone.default, (a,))
    if mapping:
        out.args = torch.utils._pytree.tree_map(lambda a: mapping.get(a, a) if _is_node(a) else a, out.args)


def _describe(site: HandwrittenSite) -> str:
    spec = site.spec
    if spec.charge != "leaky":
        law = {"sj_decay_input": "v + (input - (v - v_rest)) / tau", "sj_decay_input_mul": "v + (input - (v - v_rest)) * inv_tau",
               "sj_no_decay_input": "v - (v - v_rest) / tau + input", "sj_no_decay_input_mul": "v - (v - v_rest) * inv_tau + input"}[spec.charge]
        if site.rule == "integrator":
            return f"integrator v = {law} (no spikes)"
        test = ">" if spec.compare == "gt" else ">="
        return f"LIF v = {law}, spike v {test} {_short(spec.threshold)}, {spec.reset} reset (same step)"
    if site.rule == "integrator":
        return f"integrator v = {_short(spec.decay)} * v + input (no spikes)"
    test = ">" if spec.compare == "gt" else ">="
    if spec.spike_from == "stored":
        return (f"LIF spike v {test} {_short(spec.threshold)} on the stored membrane, then v = {_short(spec.decay)} * v + input, "
                f"{spec.reset} reset by that spike")
    timing = "same step" if spec.reset_timing == "same_step" else "by the previous step's spike"
    return f"LIF v = {_short(spec.decay)} * v + input, spike v {test} {_short(spec.threshold)}, {spec.reset} reset ({timing})"


def _short(t: torch.Tensor) -> str:
    return f"{float(t):g}" if t.numel() == 1 else f"tensor{list(t.shape)}"


# ------------------------------------------------------------------ probing and the eager reference


class _CompareRecorder(TorchFunctionMode):
    """Records the result of every comparison in an eager run (torch-function level)."""

    def __init__(self):
        super().__init__()
        self.results: list[torch.Tensor] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _COMPARE_FUNCS and isinstance(out, torch.Tensor):
            self.results.append(out.detach())
        return out


def _count_compares(model, x) -> int:
    with torch.no_grad(), _CompareRecorder() as rec:
        model(x)
    return len(rec.results)


class HandwrittenOriginal(torch.nn.Module):
    """The user's model, run eagerly; also replays each recognised neuron's spikes.

    The spike tests of the eager run are recorded in order; the capture told us which
    test of each step belongs to which neuron (``offsets``, ``per_step`` tests per step,
    ``fixed`` tests outside the loop), so each :class:`HandwrittenNeuron` is called with
    its layer's spikes, step by step, and verify's per-layer hooks see them.  With
    ``layer_major`` (neurons that each loop over the whole sequence, one after the other),
    each neuron's tests are consecutive instead: ``offsets`` are where they start in the
    capture, which ran ``capture_steps`` steps.
    """

    def __init__(self, model: torch.nn.Module, neurons: list[NeuronModule], offsets: dict[int, int], per_step: int, fixed: int,
                 layer_major: bool = False, capture_steps: int = 0):
        super().__init__()
        self.model = model
        self.recorders = torch.nn.ModuleList([n.module for n in neurons])
        self.offsets = offsets
        self.per_step = per_step
        self.fixed = fixed
        self.layer_major, self.capture_steps = layer_major, capture_steps

    def forward(self, x):
        with _CompareRecorder() as rec:
            out = self.model(x)
        n = len(rec.results)
        if self.layer_major and self.offsets and (n - self.fixed) % len(self.offsets) == 0 and n > self.fixed:
            steps = (n - self.fixed) // len(self.offsets)
            for rank, (i, off) in enumerate(sorted(self.offsets.items(), key=lambda item: item[1])):
                start = off + rank * (steps - self.capture_steps)  # the blocks before this one grew with T
                for t in range(steps):
                    self.recorders[i](rec.results[start + t].float())
        elif self.per_step and self.offsets and (n - self.fixed) % self.per_step == 0 and n > self.fixed:
            steps = (n - self.fixed) // self.per_step
            if all(off + (steps - 1) * self.per_step < n for off in self.offsets.values()):
                for t in range(steps):
                    for i, off in self.offsets.items():
                        self.recorders[i](rec.results[off + t * self.per_step].float())
        return out


def _probe(model, sample_shape, time_steps, kind, batch_first=False) -> InputLayout:
    errors = []
    ran = any_spike_test = False
    if kind == "step":
        raise UsageError("--input-kind step: a hand-written model keeps no neuron state between calls; "
                         "its time loop must be inside forward (sequence or static input).")
    if kind in ("auto", "static"):
        try:
            n3 = _count_compares(model, torch.rand(3, *sample_shape))
            n5 = _count_compares(model, torch.rand(5, *sample_shape))
            ran, any_spike_test = True, any_spike_test or n3 > 0 or n5 > 0
            if n3 == n5 and n3 > 0:
                return InputLayout("static", 0, False, sample_shape)
            errors.append(f"as [B, ...]: {n3} and {n5} spike tests for batch 3 and 5")
        except Exception as exc:
            errors.append(f"as [B, {', '.join(map(str, sample_shape))}]: {type(exc).__name__}: {exc}")
    if kind in ("auto", "sequence"):
        def count(x):
            nonlocal ran, any_spike_test
            n = _count_compares(model, x)
            ran, any_spike_test = True, any_spike_test or n > 0
            return n

        layout = probe_sequence(count, sample_shape, time_steps, batch_first, errors, lambda n1, n2, steps: n2 > n1)
        if layout is not None:
            if not layout.dynamic_time:  # the count is of spike tests; the steps are read from the capture
                layout.time_steps = time_steps
            return layout
    if ran and not any_spike_test:
        raise NotConvertibleError({"model": "no neuron module of a supported framework was found (see `psu-export "
                                   "list-converters`), and running it shows no spike test (x > threshold) of a "
                                   "hand-written neuron loop"})
    raise UsageError(
        "No neuron module of a supported framework was found, and the model could not be run as a hand-written "
        f"spiking loop with --input-shape {','.join(map(str, sample_shape))} and --time-steps {time_steps}: "
        + "; ".join(errors) + ". Check --input-shape (one time step's sample, without batch and time) or pass --input-kind."
    )


def capture_handwritten(model: torch.nn.Module, layout, capture_steps: int | None = None):
    """Capture ``model`` at a small T and replace its recognised neuron steps by neuron calls;
    returns ``(captured, the spike comparisons of the capture, the matched sites)``."""
    captured = capture(model, [], layout, capture_steps)
    compares = [n for n in captured.graph_module.graph.nodes if n.op == "call_function" and n.target in _COMPARE_TARGETS]
    sites = apply_patterns(captured)
    try:
        if not CONVERTER.consumes_sequence(captured.neurons[0].module):
            reroll(captured.graph_module)
    except NotConvertibleError as exc:  # a recurrence no rule recognised: name where matching stopped
        reasons = _dedupe(captured.pattern_failures)
        reasons.update(exc.reasons)
        raise NotConvertibleError(reasons, "The model has a recurrence that is not a recognised neuron:") from exc
    captured.capture_steps = len(sites[0].steps)
    return captured, compares, sites


def prepare_handwritten(loaded: LoadedModel, sample_shape: tuple[int, ...], time_steps: int, kind: str = "auto", say=None, batch_first: bool = False):
    """Probe, capture and pattern-match a model without neuron modules.

    Returns ``(loaded, neurons, layout, captured)`` where ``loaded.module`` is a
    :class:`HandwrittenOriginal` wrapping the user's model (the verification reference).
    """
    say = say or (lambda message: None)
    model = loaded.module
    layout = _probe(model, tuple(sample_shape), time_steps, kind, batch_first)
    say(f"hand-written loop, input: {layout.kind}; capturing")
    captured, compares, sites = capture_handwritten(model, layout)
    steps = len(sites[0].steps)
    if not layout.dynamic_time:
        layout.time_steps = steps
    # which eager comparison belongs to which neuron (for per-layer parity)
    index = {c: i for i, c in enumerate(compares)}
    offsets, per_step = {}, 0
    for i, site in enumerate(sites):
        if site.rule != "lif":
            continue
        idx = [index[s.compare] for s in site.steps]
        gaps = {b - a for a, b in zip(idx, idx[1:])}
        if len(gaps) == 1:
            per_step = gaps.pop()
            offsets[i] = idx[0]
    layer_major = CONVERTER.consumes_sequence(captured.neurons[0].module)
    if layer_major:  # each neuron's tests are consecutive, a block of steps
        fixed = len(compares) - len(offsets) * captured.capture_steps
    else:
        fixed = len(compares) - per_step * steps
    reference = HandwrittenOriginal(model, captured.neurons, offsets if per_step else {}, per_step, fixed, layer_major, captured.capture_steps)
    reference.eval()
    say(f"recognised {len(sites)} hand-written neuron layer(s)")
    return LoadedModel(reference, loaded.source), captured.neurons, layout, captured

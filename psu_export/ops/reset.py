"""The probabilistic reset of the PSU paper (arXiv 2402.00449) as one ``psu`` op.

A LIF layer with subtract reset, unrolled over time, is ``U = A X - c R S``: the
reset-free potential ``u = A X`` plus a reset term that needs the spikes ``S`` of earlier
steps, the only sequential dependency.  The PSU replaces ``S`` *in the reset term* by an
estimate ``Z`` that does not depend on ``U``, so every step is computed at once::

    u = A X                                  (LIF integration, or a learned causal T x T map)
    Z = sigmoid(a u + b)                      ("membrane" estimate; a = 1, b = 0 is the paper)
      | sigmoid(W_R X + b_R)                 ("learned": RPSU)
      | X                                    ("input": the authors' code's IPSU)
    Z <- 1[hash_uniform(key, index) < Z]     (StochasticReset only: Bernoulli samples)
    r_t = sum_{j<t} d^(t-1-j) Z_j            (reset_timing "previous_step", snnTorch)
    r_t = sum_{j<t} d^(t-j)   Z_j            (reset_timing "same_step")
    U = u - c r;   spikes = g H(U - theta);   membrane = U ("pre") or U - theta H ("post")

Both sums are first-order linear recurrences, solved by ``linear_scan`` of
:mod:`~psu_export.ops.builders` (in chunks of a few sequential steps joined by a log-depth
doubling scan over the chunk ends, or, on small layers, by the doubling scan alone; no
``d^-T`` rescaling, so no overflow for long T); the
whole layer is written once, :func:`reset_layer`, against the builder interface, so the
torch op, the trainable modules of :mod:`psu_export.psu` and the ONNX function body do the
same float operations in the same order: torch and onnxruntime agree bit for bit.

Op types (one ONNX function per variant, attached after export): ``psu.ProbabilisticReset_*``
(``--reset psu``), ``psu.StochasticReset_*`` (``--reset stochastic``), and ``psu.PSU_*``,
``psu.IPSU_*``, ``psu.RPSU_*`` for the project's own modules.

Random numbers: a counter-based hash of (key, element index): three rounds of an affine map
and a squaring modulo the prime 2^31 - 1, built from int64
Add/Mul/Div/Mod only (every intermediate value stays below 2^62, so no overflow and no
Bitwise*/BitShift, which the CUDA provider lacks); the key pair is derived from
(seed, layer name) and carried as the node's ``key_mul`` / ``key_add`` attributes.  The
element index is the row-major position in the layer's ``[T, B, ...]`` tensor, so the
draws depend on the batch layout but never on the provider or the run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import asdict, dataclass, fields

import onnx
import torch
from onnx import helper

from .builders import OnnxBuilder, TorchBuilder, exact_sigmoid
from .registry import CustomOp, emit_node, make_function, register

#: the Mersenne prime 2^31 - 1: every hash state is below it, so products of two states fit in int64
PRIME = 2_147_483_647
#: (multiplier, increment, square increment) per mixing round ``h = (h m + c) mod P; h = (h^2 + k) mod P``;
#: all < 2^31.  Checked on 2^21 indices: chi-square of 256 bins, of lag-1 and lag-64 pairs
#: (32 x 32 bins) and lag correlations all within the range expected of independent uniforms.
HASH_ROUNDS = (
    (1_597_334_677, 1_013_904_223, 374_761_393),
    (1_664_525_123, 668_265_263, 1_295_855_083),
    (1_911_520_717, 2_027_382_371, 1_103_515_245),
)
_INV_2_24 = 2.0**-24

KINDS = ("ProbabilisticReset", "StochasticReset", "PSU", "IPSU", "RPSU")
#: parameters applied elementwise per neuron (``per_neuron`` in :func:`reset_layer`)
PER_NEURON = ("decay", "threshold", "reset_scale", "spike_scale", "input_scale", "v_init", "syn_decay", "i_init", "prob_scale", "prob_offset")
_TIMING_CODE = {"previous_step": "prev", "same_step": "same"}


def derive_keys(seed: int, stream: str) -> tuple[int, int]:
    """The (key_mul, key_add) pair of one layer: ``key_mul`` in [1, P), ``key_add`` in [0, P)."""
    digest = hashlib.sha256(f"psu-export:{int(seed)}:{stream}".encode()).digest()
    a = int.from_bytes(digest[:8], "little")
    c = int.from_bytes(digest[8:16], "little")
    return 1 + a % (PRIME - 1), c % PRIME


def hash_uniform(b, key_mul, key_add, index):
    """Uniform numbers in [0, 1) (multiples of 2^-24) from int64 ``index`` >= 0 and the key.

    ``key_mul`` / ``key_add`` are int64 scalars of the builder.  Every state is in
    [0, 2^31), every product below 2^62.
    """
    p = b.const_int(PRIME)
    h = b.mod(b.mul(b.add(b.mod(index, p), b.const_int(1)), key_mul), p)
    h = b.mod(b.add(h, key_add), p)
    for mult, inc, square_inc in HASH_ROUNDS:
        h = b.mod(b.add(b.mul(h, b.const_int(mult)), b.const_int(inc)), p)
        h = b.mod(b.add(b.mul(h, h), b.const_int(square_inc)), p)
    top24 = b.floordiv(h, b.const_int(128))  # < 2^24: exact in float32
    return b.mul(b.to_float(top24), b.const(_INV_2_24))


@dataclass(frozen=True)
class ResetOptions:
    """The discrete options of one probabilistic-reset layer (node attributes; see module docstring)."""

    kind: str = "ProbabilisticReset"
    integration: str = "lif"  # "lif" | "learned"
    estimate: str = "membrane"  # "membrane" | "learned" | "input"
    reset_timing: str = "same_step"  # "previous_step" | "same_step"
    compare: str = "gt"
    membrane: str = "post"  # "pre" | "post"
    two_state: bool = False
    #: every per-neuron parameter is one value: the ONNX body broadcasts it as a scalar
    #: instead of expanding it over ``[B, ...]`` (set at export, :meth:`ResetNeuronOp.translate`)
    scalar_params: bool = False
    key_mul: int = 1
    key_add: int = 0

    def __post_init__(self):
        checks = {
            "kind": KINDS,
            "integration": ("lif", "learned"),
            "estimate": ("membrane", "learned", "input"),
            "reset_timing": tuple(_TIMING_CODE),
            "compare": ("gt", "ge"),
            "membrane": ("pre", "post"),
        }
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        if self.two_state and self.integration != "lif":
            raise ValueError("two-state (synaptic) integration needs integration='lif'")

    @property
    def stochastic(self) -> bool:
        return self.kind == "StochasticReset"

    @property
    def variant(self) -> str:
        parts = [self.integration, self.estimate, _TIMING_CODE[self.reset_timing], self.compare, self.membrane]
        return "_".join(parts + (["syn"] if self.two_state else []) + (["sc"] if self.scalar_params else []))

    @property
    def n_outputs(self) -> int:
        """spikes, membrane, and the synaptic current for two-state layers."""
        return 3 if self.two_state else 2

    @property
    def op_type(self) -> str:
        return f"{self.kind}_{self.variant}"

    @property
    def param_names(self) -> list[str]:
        names = ["decay", "threshold", "reset_scale", "spike_scale"]
        if self.integration == "lif":
            names += ["input_scale", "v_init"] + (["syn_decay", "i_init"] if self.two_state else [])
        else:
            names += ["weight", "bias"]
        if self.estimate == "membrane":
            names += ["prob_scale", "prob_offset"]
        elif self.estimate == "learned":
            names += ["reset_weight", "reset_bias"]
        return names

    def attributes(self) -> dict:
        out = asdict(self)
        out["two_state"] = int(self.two_state)
        out["scalar_params"] = int(self.scalar_params)
        return out

    def key(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.attributes().items())

    @classmethod
    def parse(cls, key: str) -> "ResetOptions":
        raw = dict(item.split("=", 1) for item in key.split(","))
        return cls._from_dict(raw)

    @classmethod
    def from_node(cls, node: onnx.NodeProto) -> "ResetOptions":
        raw = {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name != "layer"}
        return cls._from_dict({k: (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()})

    @classmethod
    def _from_dict(cls, raw: dict) -> "ResetOptions":
        kw = {}
        for f in fields(cls):
            if f.name not in raw:
                continue
            value = raw[f.name]
            if f.name in ("two_state", "scalar_params"):
                value = str(value) in ("1", "True", "true")
            elif f.name in ("key_mul", "key_add"):
                value = int(value)
            kw[f.name] = value
        return cls(**kw)


def reset_layer(b, o: ResetOptions, p: dict, x, keys=None):
    """The layer over ``x[T, B, ...]`` (module docstring); returns ``(spikes, membrane)``, plus
    the synaptic current for two-state layers.

    ``b`` is a builder, ``p`` maps :attr:`ResetOptions.param_names` to builder values,
    ``keys`` the builder's int64 ``(key_mul, key_add)`` (StochasticReset only).
    """
    flat = b.flatten_time(x)
    current = None

    def per(name):
        return b.per_neuron(p[name], x)

    decay = per("decay")
    if o.integration == "lif":
        drive = b.mul(flat, per("input_scale"))
        if o.two_state:
            syn = per("syn_decay")
            drive = current = b.linear_scan(b.first_step_add(drive, b.mul(syn, per("i_init"))), syn)
        u = b.linear_scan(b.first_step_add(drive, b.mul(decay, per("v_init"))), decay)
    else:
        u = b.learned_product(p["weight"], p["bias"], flat)
    if o.estimate == "membrane":
        z = exact_sigmoid(b, b.add(b.mul(u, per("prob_scale")), per("prob_offset")))
    elif o.estimate == "learned":
        z = exact_sigmoid(b, b.learned_product(p["reset_weight"], p["reset_bias"], flat))
    else:
        z = flat
    if o.stochastic:
        z = b.step(z, hash_uniform(b, keys[0], keys[1], b.element_index(flat)), "gt")  # 1 where uniform < z
    r = b.shift_time(b.linear_scan(z, decay), 1)
    if o.reset_timing == "same_step":
        r = b.mul(decay, r)
    potential = b.sub(u, b.mul(per("reset_scale"), r))
    threshold = per("threshold")
    fired = b.step(potential, threshold, o.compare)
    spikes = b.mul(fired, per("spike_scale"))
    membrane = potential if o.membrane == "pre" else b.sub(potential, b.mul(fired, threshold))
    out = (b.unflatten_like(spikes, x), b.unflatten_like(membrane, x))
    return out + ((b.unflatten_like(current, x),) if o.two_state else ())


def run_reset_layer(b, x: torch.Tensor, params: list[torch.Tensor], o: ResetOptions):
    """:func:`reset_layer` on torch tensors with a torch builder ``b`` (eager or surrogate)."""
    names = o.param_names
    if len(params) != len(names):
        raise ValueError(f"expected parameters {names}, got {len(params)} tensors")
    keys = (b.const_int(o.key_mul), b.const_int(o.key_add)) if o.stochastic else None
    return reset_layer(b, o, dict(zip(names, params)), x, keys)


@torch.library.custom_op("psu::reset_neuron", mutates_args=())
def reset_neuron(x: torch.Tensor, params: list[torch.Tensor], options: str, layer: str) -> list[torch.Tensor]:
    """A probabilistic / stochastic reset layer over ``x[T, B, ...]``: ``[spikes, membrane(, current)]``."""
    o = ResetOptions.parse(options)
    if x.shape[0] == 0:
        return [torch.empty_like(x) for _ in range(o.n_outputs)]
    return list(run_reset_layer(TorchBuilder(), x, params, o))


@reset_neuron.register_fake
def _reset_neuron_fake(x, params, options, layer):
    return [torch.empty_like(x) for _ in range(ResetOptions.parse(options).n_outputs)]


def _attribute_int(b: OnnxBuilder, name: str) -> str:
    """An int64 scalar whose value is the function's attribute ``name`` (a reference, per node)."""
    out = b.fresh()
    node = helper.make_node("Constant", [], [out])
    ref = onnx.AttributeProto()
    ref.name, ref.ref_attr_name, ref.type = "value_int", name, onnx.AttributeProto.INT
    node.attribute.append(ref)
    b.nodes.append(node)
    return out


class ResetNeuronOp(CustomOp):
    """``psu::reset_neuron`` <-> ``psu.<kind>_<variant>``; the body is :func:`reset_layer`."""

    torch_op = torch.ops.psu.reset_neuron.default
    op_type_prefixes = KINDS

    def translate(self, x, params, options: str, layer: str):
        o = ResetOptions.parse(options)
        shapes = [p.shape for name, p in zip(o.param_names, params) if name in PER_NEURON]
        if all(shape is not None and shape.is_static() and math.prod(shape.numpy()) == 1 for shape in shapes):
            o = dataclasses.replace(o, scalar_params=True)
        return emit_node(o.op_type, [x, *params], o.n_outputs, layer=layer, **o.attributes())

    def function(self, node: onnx.NodeProto, opset: int) -> onnx.FunctionProto:
        o = ResetOptions.from_node(node)
        b = OnnxBuilder("f")
        if o.scalar_params:  # broadcast as they are: the same floats as expanded, and onnxruntime's scalar fast path
            b.scalars.update(name for name in o.param_names if name in PER_NEURON)
        keys = (_attribute_int(b, "key_mul"), _attribute_int(b, "key_add")) if o.stochastic else None
        values = reset_layer(b, o, {name: name for name in o.param_names}, "x", keys)
        outputs = ["spikes", "membrane", "current"][: o.n_outputs]
        for value, name in zip(values, outputs):
            b.nodes.append(helper.make_node("Identity", [value], [name]))
        return make_function(node, b.nodes, ["x", *o.param_names], outputs, opset)


RESET = register(ResetNeuronOp())

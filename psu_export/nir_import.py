"""Load a NIR graph (``.nir``, https://neuroir.org) as a single-step PyTorch module.

:func:`load_nir` reads the file with the ``nir`` package and builds a :class:`NIRNet`
written here (not nirtorch's): one module per NIR node, run in topological order once per
time step (the ``step`` input kind: psu-export drives time, the ONNX model takes
``[T, B, ...]`` and returns every output stacked over time).  Several edges into one
node are summed (NIR's semantics).  Neuron nodes become :class:`NirNeuron` modules that
the ``nir`` converter (``converters/nir.py``) maps to an exact :class:`NeuronSpec`.

Discretisation (forward Euler with step ``dt``; ``k = dt / tau``).  NIR gives continuous
equations; this is the discrete model psu-export converts and verifies against (the
eager :class:`NirNeuron` run is the sequential reference)::

    LIF      tau v' = (v_leak - v) + r I          v_t = (1 - k) v_{t-1} + (k r I_t + k v_leak)
    IF       v' = r I                             v_t = v_{t-1} + (dt r) I_t
    LI       as LIF, no spikes (output v)
    I        as IF, no spikes (output v)
    CubaLIF  tau_syn I' = -I + w_in S             with a = 1 - dt/tau_syn, k_m = dt/tau_mem and the
             tau_mem v' = (v_leak - v) + r I      current kept scaled, J = k_m (r I + v_leak):
                                                  J_t = a J_{t-1} + (k_m r (dt/tau_syn) w_in S_t + (1 - a) k_m v_leak)
                                                  v_t = (1 - k_m) v_{t-1} + J_t          (J_0 = k_m v_leak)
    spikes   z_t = 1[v_t > v_threshold] (strict), then the reset in the same step:
             --nir-reset zero (default, NIR's semantics): v_t <- v_reset where z_t = 1
                                       computed as z v_reset + (1 - z) v_t
             --nir-reset subtract:     v_t <- v_t - z v_threshold   (NIR cannot express this
                                       reset; choose it when the graph came from a model trained
                                       with subtract reset, e.g. snnTorch's default)
    initial state v_0 = 0, I_0 = 0

The input term ``k r I + k v_leak`` is computed as ``gain * I + bias`` with ``gain`` and
``bias`` folded once in float64 and stored as float32.  Forward Euler needs ``dt <= tau``;
larger steps are refused.

Other nodes: ``Affine`` (``W x + b``), ``Linear`` (``W x``), ``Scale``, ``Conv2d``,
``Flatten`` (dimensions as NIR counts them, without batch), ``SumPool2d`` (the window's
mean times its size: exact for spike counts), ``AvgPool2d``, ``Input``/``Output``.  Recurrent edges (cycles), nested graphs and
other node types are refused with the node's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import NotConvertibleError, UsageError, one_line
from .spec import NEVER_FIRES

DEFAULT_DT = 1e-4  # the dt snnTorch's and SpikingJelly's NIR exporters write with
RESETS = ("zero", "subtract")


def _t(a) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64)).float()


class NirNeuron(nn.Module):
    """One step of one NIR neuron population; its state is kept between calls.

    ``forward(x)`` returns ``(spikes, membrane)`` or, for ``CubaLIF``,
    ``(spikes, current, membrane)``; reset-free kinds (``LI``, ``I``) return zero spikes.
    Parameters are float32 tensors that broadcast on the trailing (neuron) dimensions.
    """

    def __init__(self, kind: str, decay, gain, bias, threshold, reset: str, reset_value, syn_decay=None, i_init=None):
        super().__init__()
        self.kind = kind
        self.reset = reset
        self.register_buffer("decay", _t(decay))
        self.register_buffer("gain", _t(gain))
        self.register_buffer("bias", _t(bias))
        self.register_buffer("threshold", _t(threshold))
        self.register_buffer("reset_value", _t(reset_value))
        self.register_buffer("syn_decay", None if syn_decay is None else _t(syn_decay))
        self.register_buffer("i_init", _t(0.0 if i_init is None else i_init))
        self.v: torch.Tensor | None = None
        self.i: torch.Tensor | None = None

    @property
    def spiking(self) -> bool:
        return self.kind in ("LIF", "CubaLIF", "IF")

    def drive(self, x: torch.Tensor) -> torch.Tensor:
        """The per-step input term (no state): ``gain * x + bias``."""
        return self.gain * x + self.bias

    def forward(self, x):
        d = self.drive(x)
        out_current = None
        if self.syn_decay is not None:
            i = self.i if self.i is not None else self.i_init.expand_as(d)
            i = self.syn_decay * i + d
            self.i, d, out_current = i, i, i
        v = self.v if self.v is not None else torch.zeros_like(d)
        h = self.decay * v + d
        if self.spiking:
            s = (h > self.threshold).to(torch.float32)
            if self.reset == "zero":
                v = s * self.reset_value + (1.0 - s) * h
            else:
                v = h - s * self.threshold
        else:
            s = torch.zeros_like(h)
            v = h
        self.v = v
        return (s, v) if out_current is None else (s, out_current, v)

    def reset_state(self) -> None:
        self.v = None
        self.i = None

    def extra_repr(self) -> str:
        return f"{self.kind}, reset={self.reset if self.spiking else 'none'}"


class NirPopulation(nn.Module):
    """A NIR neuron node: the neuron and which of its outputs the graph passes on."""

    def __init__(self, neuron: NirNeuron):
        super().__init__()
        self.neuron = neuron

    def forward(self, x):
        out = self.neuron(x)
        return out[0] if self.neuron.spiking else out[-1]


class _Affine(nn.Module):
    def __init__(self, weight, bias=None):
        super().__init__()
        self.register_buffer("weight", _t(weight))
        self.register_buffer("bias", None if bias is None else _t(bias))

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class _Scale(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.register_buffer("scale", _t(scale))

    def forward(self, x):
        return x * self.scale


class _Conv2d(nn.Module):
    def __init__(self, node):
        super().__init__()
        self.register_buffer("weight", _t(node.weight))
        bias = np.asarray(node.bias) if node.bias is not None else None
        self.register_buffer("bias", None if bias is None or bias.size == 0 else _t(bias).reshape(-1).expand(self.weight.shape[0]).clone())
        self.stride = _pair(node.stride)
        self.padding = node.padding if isinstance(node.padding, str) else _pair(node.padding)
        self.dilation = _pair(node.dilation)
        self.groups = int(node.groups)

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _Pool2d(nn.Module):
    def __init__(self, node, summed: bool):
        super().__init__()
        self.kernel = _pair(node.kernel_size)
        self.stride = _pair(node.stride)
        self.padding = _pair(node.padding)
        self.summed = summed

    def forward(self, x):
        out = F.avg_pool2d(x, self.kernel, self.stride, self.padding, count_include_pad=True)
        if self.summed:  # (divisor_override=1 is lost by the ONNX exporter); exact for spike counts
            out = out * float(self.kernel[0] * self.kernel[1])
        return out


class _Flatten(nn.Module):
    def __init__(self, node):
        super().__init__()
        shape = node.output_type.get("output") if node.output_type else None
        self.out_shape = None if shape is None else tuple(int(d) for d in np.asarray(shape).reshape(-1))
        self.start = int(node.start_dim)
        self.end = int(node.end_dim)

    def forward(self, x):
        if self.out_shape is not None:
            return x.reshape(x.shape[0], *self.out_shape)
        start = self.start + 1 if self.start >= 0 else self.start
        end = self.end + 1 if self.end >= 0 else self.end
        return torch.flatten(x, start, end)


def _pair(v):
    a = np.asarray(v).reshape(-1)
    if a.size == 1:
        return (int(a[0]), int(a[0]))
    return tuple(int(x) for x in a)


class NIRNet(nn.Module):
    """A NIR graph as one time step: nodes in topological order, edges into a node summed."""

    def __init__(self, layers: dict[str, nn.Module], order: list[str], sources: dict[str, list[str]], input_name: str, output_name: str):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.order = order
        self.sources = sources
        self.input_name = input_name
        self.output_name = output_name
        #: added to the parity report's notes (see pipeline.prepare)
        self.conversion_notes: list[str] = []

    def forward(self, x):
        values = {self.input_name: x}
        for key in self.order:
            ins = [values[s] for s in self.sources[key]]
            value = ins[0]
            for other in ins[1:]:
                value = value + other
            values[key] = self.layers[key](value) if key in self.layers else value
        return values[self.output_name]


def _key(name: str) -> str:
    safe = "".join(c if c.isalnum() or c == "_" else "_" for c in str(name))
    return safe if safe and not safe[0].isdigit() else f"n_{safe}"


def _neuron(name: str, node, dt: float, reset: str) -> NirNeuron:
    import nir

    def arr(a, default=None):
        if a is None:
            return np.asarray(default, dtype=np.float64)
        return np.asarray(a, dtype=np.float64)

    def rate(tau, what):
        tau = arr(tau)
        if np.any(tau <= 0):
            raise UsageError(f"NIR node {name!r}: {what} must be positive.")
        k = dt / tau
        if np.any(k > 1):
            raise UsageError(f"NIR node {name!r}: --dt {dt:g} is larger than {what} (min {tau.min():g}); forward Euler "
                             "needs dt <= tau. Pass a smaller --dt (the dt the graph was exported with).")
        return k

    kind = type(node).__name__
    if isinstance(node, (nir.LIF, nir.LI)):
        k = rate(node.tau, "tau")
        decay, gain, bias = 1.0 - k, k * arr(node.r), k * arr(node.v_leak)
        syn_decay = i_init = None
    elif isinstance(node, (nir.IF, nir.I)):
        gain = dt * arr(node.r)
        decay, bias = np.ones_like(gain), np.zeros_like(gain)
        syn_decay = i_init = None
    elif isinstance(node, nir.CubaLIF):
        ks, km = rate(node.tau_syn, "tau_syn"), rate(node.tau_mem, "tau_mem")
        syn_decay = 1.0 - ks
        leak = km * arr(node.v_leak)
        gain = km * arr(node.r) * ks * arr(node.w_in, 1.0)
        bias = (1.0 - syn_decay) * leak
        decay, i_init = 1.0 - km, leak
    else:
        raise NotConvertibleError({name: f"NIR {kind} nodes are not supported"})
    threshold = arr(getattr(node, "v_threshold", None), NEVER_FIRES) if kind in ("LIF", "CubaLIF", "IF") else np.asarray(NEVER_FIRES)
    v_reset = arr(getattr(node, "v_reset", None), 0.0)
    if kind in ("LIF", "CubaLIF", "IF") and reset == "subtract" and np.any(v_reset != 0):
        raise UsageError(f"NIR node {name!r} has a nonzero v_reset; --nir-reset subtract removes the threshold and "
                         "ignores v_reset, so it is refused here (use --nir-reset zero).")
    return NirNeuron(kind, decay, gain, bias, threshold, reset, v_reset, syn_decay, i_init)


def build(graph, dt: float = DEFAULT_DT, reset: str = "zero") -> NIRNet:
    """The :class:`NIRNet` of a ``nir.NIRGraph``."""
    import nir

    if reset not in RESETS:
        raise UsageError(f"--nir-reset must be one of {', '.join(RESETS)} (got {reset!r}).")
    if not dt > 0:
        raise UsageError(f"--dt must be positive (got {dt}).")
    inputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Input)]
    outputs = [n for n, node in graph.nodes.items() if isinstance(node, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise NotConvertibleError({"graph": f"one Input and one Output node are supported (found {len(inputs)} and {len(outputs)})"})
    keys = {name: _key(name) for name in graph.nodes}
    if len(set(keys.values())) != len(keys):
        raise UsageError("NIR node names collide after making them Python identifiers; rename the nodes.")
    sources: dict[str, list[str]] = {keys[n]: [] for n in graph.nodes}
    for src, dst in graph.edges:
        if src not in graph.nodes or dst not in graph.nodes:
            raise NotConvertibleError({f"edge {src} -> {dst}": "refers to a node that is not in the graph (nested graphs are not supported)"})
        sources[keys[dst]].append(keys[src])
    # topological order (Kahn); a cycle is recurrent feedback
    indeg = {k: len(v) for k, v in sources.items()}
    users: dict[str, list[str]] = {k: [] for k in sources}
    for dst, srcs in sources.items():
        for s in srcs:
            users[s].append(dst)
    ready = [keys[inputs[0]]] + [k for k, d in indeg.items() if d == 0 and k != keys[inputs[0]]]
    order = []
    while ready:
        k = ready.pop(0)
        order.append(k)
        for u in users[k]:
            indeg[u] -= 1
            if indeg[u] == 0:
                ready.append(u)
    if len(order) != len(sources):
        stuck = sorted(k for k in sources if k not in order)
        raise NotConvertibleError({f"node {s}": "is part of a recurrent loop (a cycle of edges): recurrent feedback cannot be parallelised over time" for s in stuck})
    layers: dict[str, nn.Module] = {}
    reasons = {}
    for name, node in graph.nodes.items():
        key = keys[name]
        try:
            if isinstance(node, (nir.Input, nir.Output)):
                continue
            if isinstance(node, (nir.LIF, nir.CubaLIF, nir.IF, nir.LI, nir.I)):
                layers[key] = NirPopulation(_neuron(name, node, dt, reset))
            elif isinstance(node, nir.Affine):
                layers[key] = _Affine(node.weight, node.bias)
            elif isinstance(node, nir.Linear):
                layers[key] = _Affine(node.weight)
            elif isinstance(node, nir.Scale):
                layers[key] = _Scale(node.scale)
            elif isinstance(node, nir.Conv2d):
                layers[key] = _Conv2d(node)
            elif isinstance(node, nir.Flatten):
                layers[key] = _Flatten(node)
            elif isinstance(node, nir.SumPool2d):
                layers[key] = _Pool2d(node, summed=True)
            elif isinstance(node, nir.AvgPool2d):
                layers[key] = _Pool2d(node, summed=False)
            elif isinstance(node, nir.NIRGraph):
                reasons[name] = "nested NIR graphs (e.g. snnTorch's RLeaky export) are not supported"
            else:
                reasons[name] = f"NIR {type(node).__name__} nodes are not supported"
        except NotConvertibleError as exc:
            reasons.update(exc.reasons)
    if reasons:
        raise NotConvertibleError(reasons)
    order = [k for k in order if k != keys[inputs[0]]]
    layers = {k: layers[k] for k in order if k in layers}  # modules (and neuron sites) in graph order
    net = NIRNet(layers, order, sources, keys[inputs[0]], keys[outputs[0]])
    spiking = [n for n, node in graph.nodes.items() if isinstance(node, (nir.LIF, nir.CubaLIF, nir.IF))]
    net.conversion_notes.append(
        f"NIR graph discretised with forward Euler, dt={dt:g} (--dt); v(0)=0, I(0)=0. NIR cannot express a subtract "
        f"(soft) reset: the spiking nodes ({', '.join(spiking) or 'none'}) use --nir-reset {reset}"
        + (" (NIR's own semantics: v <- v_reset)." if reset == "zero" else " (v <- v - v_threshold, chosen by the user; not NIR's semantics).")
        + " Parity is against psu-export's sequential reference of this discretisation (psu_export/nir_import.py)."
    )
    return net


def load_nir(path, dt: float | None = None, reset: str = "zero") -> NIRNet:
    """Read a ``.nir`` file and build its :class:`NIRNet` (see the module docstring)."""
    try:
        import nir
    except ImportError as exc:
        raise UsageError("Reading .nir files needs the nir package: pip install 'nir>=1.0.8'.") from exc
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"The NIR file {path} does not exist.")
    try:
        graph = nir.read(str(path))
    except Exception as exc:
        raise UsageError(f"Could not read the NIR file {path}: {one_line(exc)}") from exc
    net = build(graph, DEFAULT_DT if dt is None else float(dt), reset)
    return net.eval()


def input_shape_of(path) -> tuple[int, ...] | None:
    """The sample shape of the graph's Input node, when the file records it."""
    try:
        import nir

        graph = nir.read(str(path))
        node = next(n for n in graph.nodes.values() if isinstance(n, nir.Input))
        shape = node.input_type.get("input")
        return None if shape is None else tuple(int(d) for d in np.asarray(shape).reshape(-1))
    except Exception:
        return None

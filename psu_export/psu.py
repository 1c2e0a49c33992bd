"""Trainable Parallel Spiking Units (PSU, IPSU, RPSU; arXiv 2402.00449) over ``[T, B, ...]``.

The paper starts from the discrete LIF neuron with soft reset (BrainCog ``LIFNode``)::

    H_t = (1 - 1/tau) V_{t-1} + X_t / tau,   S_t = H(H_t - theta),   V_t = H_t - theta S_t

unrolled over T steps ``H = A X - theta B S`` with ``A_ij = (1/tau) lambda^(i-j)`` (i >= j),
``B_ij = lambda^(i-j)`` (i > j), ``lambda = 1 - 1/tau``.  The only sequential part is ``B S``;
the PSU family replaces the spikes in the reset term by an estimate, so leaky integration
is decoupled from firing and every step is computed at once:

=========  =====================================================================
``PSU``    ``U = A X - theta B sigmoid(A X)``; nothing learned
``IPSU``   ``U = A_I X + b - theta B sigmoid(A_I X + b)``: a learned causal (lower-
           triangular) T x T integration matrix and a per-step bias, *with* the
           probabilistic reset
``RPSU``   ``U = A X - theta B sigmoid(A_R X + b_R)``: fixed integration, a learned
           causal T x T matrix (and per-step bias) for the reset estimate
=========  =====================================================================

and ``S = H(U - theta)`` with the strict comparison ``>``.  Every flattened neuron (all
non-time axes) shares the time-axis weights, as in the authors' code.

``code_compat=True`` reproduces the authors' public code (BrainCog ``node.py``;
NEURON_SEMANTICS.md section 2.2) instead of the paper:

* decay ``1/tau`` instead of ``1 - 1/tau`` (``generate_matrix``: ``m1 = (1/tau)^(i-j+1)``,
  ``m2 = -(1/tau)^(i-j)``); the two agree only at ``tau = 2``;
* the reset term is scaled by the threshold in ``PSU`` only; ``IPSU`` and ``RPSU`` use
  ``m2`` unscaled (reset amount ``1 * estimate``);
* ``IPSU`` has no probabilistic reset: ``U = A_I X + b + m2 X`` (a fixed reset of the input).

Implementation notes (both settings):

* ``A X`` and ``B Z`` are first-order linear recurrences, computed by the chunked /
  log-depth doubling scan of :func:`~psu_export.ops.builders.chunked_linear_scan` (no
  T x T kernel buffer, no ``lambda^-T`` rescaling, so no overflow): ``PSU`` and
  ``RPSU``'s integration work for any T.  ``IPSU`` / ``RPSU`` learn ``max_steps x max_steps``
  matrices: a sequence of ``T <= max_steps`` steps uses their leading ``T x T`` block (the
  matrices are causal, so this equals the first T steps of a ``max_steps`` run); longer
  sequences raise ``ValueError``.
* the sigmoid is :func:`~psu_export.ops.builders.exact_sigmoid` (within 5e-7 of
  ``torch.sigmoid``), built from correctly rounded operations, so the exported ONNX
  model (:mod:`psu_export.ops.reset`, one ``psu.PSU_*`` / ``psu.IPSU_*`` / ``psu.RPSU_*`` node
  per layer) reproduces these modules bit for bit: the module's ``forward`` and the ONNX
  function body are the same program, :func:`~psu_export.ops.reset.reset_layer`.
* training (``module.train()`` with gradients on) uses the paper's matrix form instead:
  ``A`` and ``B`` are built for the sequence's T at run time (no buffers), two GEMMs and
  ``torch.sigmoid``; it equals the exported program up to float rounding and is faster to
  train.  ``gemm_training = False`` trains on the exported program itself.
* the spike's gradient is the arctan surrogate of BrainCog's ``AtanGrad``:
  ``alpha / 2 / (1 + (pi/2 alpha x)^2)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ops.builders import TorchBuilder
from .ops.reset import ResetOptions, run_reset_layer


class _AtanSpike(torch.autograd.Function):
    """Forward ``H(x > threshold)``; backward the arctan surrogate of ``x - threshold``."""

    @staticmethod
    def forward(ctx, x, threshold, alpha: float, compare: str):
        ctx.save_for_backward(x - threshold)
        ctx.alpha = alpha
        hit = x > threshold if compare == "gt" else x >= threshold
        return hit.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (diff,) = ctx.saved_tensors
        alpha = ctx.alpha
        return grad * (alpha / 2) / (1 + (math.pi / 2 * alpha * diff) ** 2), None, None, None


class SurrogateBuilder(TorchBuilder):
    """:class:`TorchBuilder` whose Heaviside has a surrogate gradient (forward unchanged)."""

    def __init__(self, alpha: float = 2.0):
        self.alpha = alpha

    def step(self, a, b, compare: str):
        if not (torch.is_grad_enabled() and isinstance(a, torch.Tensor) and a.requires_grad):
            return super().step(a, b, compare)
        return _AtanSpike.apply(a, b, self.alpha, compare)


class _ParallelSpikingUnit(nn.Module):
    """Shared machinery: options + parameter list for :func:`~psu_export.ops.reset.reset_layer`."""

    kind = "PSU"
    max_steps: int | None = None

    def __init__(self, tau: float = 2.0, threshold: float = 0.5, code_compat: bool = False, surrogate_alpha: float = 2.0):
        super().__init__()
        if not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 (got {tau}): the decay would be negative")
        self.tau = float(tau)
        self.threshold = float(threshold)
        self.code_compat = bool(code_compat)
        self.surrogate_alpha = float(surrogate_alpha)
        #: in training mode, compute with the T x T matrix form (GEMMs; faster to train, see
        #: :meth:`_gemm_dynamics`); ``False``: always the exported program
        self.gemm_training = True

    @property
    def decay(self) -> float:
        """``1 - 1/tau`` (paper) or ``1/tau`` (the authors' code)."""
        return 1.0 / self.tau if self.code_compat else 1.0 - 1.0 / self.tau

    def extra_repr(self) -> str:
        extra = f", max_steps={self.max_steps}" if self.max_steps else ""
        return f"tau={self.tau}, threshold={self.threshold}, code_compat={self.code_compat}{extra}"

    # -- the program ---------------------------------------------------------------
    def reset_options(self) -> ResetOptions:
        raise NotImplementedError

    def reset_params(self) -> dict[str, torch.Tensor]:
        """Parameters by name (differentiable where learned; learned matrices masked causal)."""
        raise NotImplementedError

    def _scalar(self, value: float) -> torch.Tensor:
        return torch.tensor(value, dtype=torch.float32, device=self._device())

    def _device(self):
        for p in self.parameters():
            return p.device
        return torch.device("cpu")

    def dynamics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(spikes, U)`` for ``x[T, B, ...]``; ``U`` is the potential the spikes are decided on."""
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} takes x[T, B, ...]; got shape {list(x.shape)}")
        if self.max_steps is not None and x.shape[0] > self.max_steps:
            raise ValueError(
                f"{type(self).__name__} learned {self.max_steps} x {self.max_steps} time matrices; "
                f"a sequence of {x.shape[0]} steps is longer (any T <= {self.max_steps} works)"
            )
        o = self.reset_options()
        params = self.reset_params()
        if self.training and self.gemm_training and torch.is_grad_enabled():
            return self._gemm_dynamics(x, o, params)
        return run_reset_layer(SurrogateBuilder(self.surrogate_alpha), x, [params[n] for n in o.param_names], o)

    def _gemm_dynamics(self, x: torch.Tensor, o: ResetOptions, p: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The paper's matrix form for training: ``A`` and ``B`` built for this T, two GEMMs and
        ``torch.sigmoid``.  Equal to the exported program up to float rounding (evaluation and
        export use the bit-reproducible program)."""
        steps = x.shape[0]
        flat = x.reshape(steps, -1)
        decay = float(p["decay"])
        if o.integration == "lif":
            u = _lif_kernel(steps, decay, float(p["input_scale"])).to(flat) @ flat
        else:
            u = p["weight"][:steps, :steps] @ flat + p["bias"][:steps, None]
        if o.estimate == "membrane":
            z = torch.sigmoid(u)
        elif o.estimate == "learned":
            z = torch.sigmoid(p["reset_weight"][:steps, :steps] @ flat + p["reset_bias"][:steps, None])
        else:
            z = flat
        reset = _lif_kernel(steps, decay, 1.0, strict=True).to(flat)
        potential = u - p["reset_scale"] * (reset @ z)
        spikes = _AtanSpike.apply(potential, p["threshold"], self.surrogate_alpha, o.compare)
        return spikes.reshape(x.shape), potential.reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dynamics(x)[0]


def _causal_mask(steps: int) -> torch.Tensor:
    return torch.tril(torch.ones(steps, steps))


def _lif_kernel(steps: int, decay: float, gain: float, strict: bool = False) -> torch.Tensor:
    """``gain * decay^(i-j)`` for i >= j (i > j if ``strict``); exponents clamped at 0, so no
    negative powers (no ``decay^-T`` overflow)."""
    idx = torch.arange(steps)
    diff = (idx[:, None] - idx[None, :]).clamp(min=0).to(torch.float32)
    return torch.tril(gain * torch.tensor(decay) ** diff, diagonal=-1 if strict else 0)


class PSU(_ParallelSpikingUnit):
    """Parallel Spiking Unit: ``U = A X - theta B sigmoid(A X)`` (module docstring); any T."""

    kind = "PSU"

    def reset_options(self) -> ResetOptions:
        return ResetOptions(kind="PSU", integration="lif", estimate="membrane", reset_timing="same_step", compare="gt", membrane="pre")

    def reset_params(self):
        s = self._scalar
        return {
            "decay": s(self.decay), "threshold": s(self.threshold), "reset_scale": s(self.threshold), "spike_scale": s(1.0),
            "input_scale": s(1.0 / self.tau), "v_init": s(0.0), "prob_scale": s(1.0), "prob_offset": s(0.0),
        }


class _LearnedTime(_ParallelSpikingUnit):
    def __init__(self, max_steps: int, tau: float = 2.0, threshold: float = 0.5, code_compat: bool = False,
                 surrogate_alpha: float = 2.0, init: str = "kaiming"):
        super().__init__(tau, threshold, code_compat, surrogate_alpha)
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (got {max_steps})")
        self.max_steps = int(max_steps)
        self.weight = nn.Parameter(torch.empty(max_steps, max_steps))
        self.bias = nn.Parameter(torch.zeros(max_steps))
        self.register_buffer("mask", _causal_mask(max_steps), persistent=False)
        self._init_matrix(self.weight, init)

    def _init_matrix(self, weight: nn.Parameter, init: str) -> None:
        """``"kaiming"``: the authors' ``nn.Linear(T, T)`` with Kaiming-normal (fan_out) weights;
        ``"lif"``: the LIF kernel ``A`` (an untrained IPSU then integrates like a PSU)."""
        with torch.no_grad():
            if init == "kaiming":
                nn.init.kaiming_normal_(weight, mode="fan_out")
            elif init == "lif":
                weight.copy_(_lif_kernel(weight.shape[0], self.decay, 1.0 / self.tau))
            else:
                raise ValueError(f"init must be 'kaiming' or 'lif' (got {init!r})")

    def _masked(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class IPSU(_LearnedTime):
    """Integration PSU: learned causal ``A_I`` and per-step bias (module docstring).

    Paper (default): ``U = A_I X + b - theta B sigmoid(A_I X + b)``.  ``code_compat=True``:
    ``U = A_I X + b + m2 X`` (no probabilistic reset, ``m2`` unscaled, decay ``1/tau``).
    """

    kind = "IPSU"

    def reset_options(self) -> ResetOptions:
        return ResetOptions(kind="IPSU", integration="learned", estimate="input" if self.code_compat else "membrane",
                            reset_timing="same_step", compare="gt", membrane="pre")

    def reset_params(self):
        s = self._scalar
        params = {
            "decay": s(self.decay), "threshold": s(self.threshold), "reset_scale": s(1.0 if self.code_compat else self.threshold),
            "spike_scale": s(1.0), "weight": self._masked(self.weight), "bias": self.bias,
        }
        if not self.code_compat:
            params.update(prob_scale=s(1.0), prob_offset=s(0.0))
        return params


class RPSU(_LearnedTime):
    """Reset PSU: fixed LIF integration, learned causal reset estimate (module docstring).

    Paper (default): ``U = A X - theta B sigmoid(A_R X + b_R)``.  ``code_compat=True``:
    decay ``1/tau`` and the reset term unscaled, ``U = m1 X + m2 sigmoid(A_R X + b_R)``.
    The learned matrix is ``weight`` (``A_R``) and ``bias`` (``b_R``).
    """

    kind = "RPSU"

    def reset_options(self) -> ResetOptions:
        return ResetOptions(kind="RPSU", integration="lif", estimate="learned", reset_timing="same_step", compare="gt", membrane="pre")

    def reset_params(self):
        s = self._scalar
        return {
            "decay": s(self.decay), "threshold": s(self.threshold), "reset_scale": s(1.0 if self.code_compat else self.threshold),
            "spike_scale": s(1.0), "input_scale": s(1.0 / self.tau), "v_init": s(0.0),
            "reset_weight": self._masked(self.weight), "reset_bias": self.bias,
        }


__all__ = ["PSU", "IPSU", "RPSU", "SurrogateBuilder"]

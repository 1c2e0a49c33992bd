"""onnxruntime sessions: the one place for provider names and their settings.

The CUDA provider computes float32 matrix products and convolutions in TF32 by default
on Ampere and newer GPUs (10-bit mantissa inputs).  That moves membranes across the
threshold and changes spikes (measured on an H200: 99.95% spike agreement with TF32 on),
so sessions for parity and benchmarks turn it off.  Deploy with the same setting
(``use_tf32=0``) to keep the parity that verify reported.

Thread pools: by default every onnxruntime session owns an intra-op thread pool whose
workers spin-wait after each parallel node.  A process that keeps several sessions and
runs them in turn (the benchmark interleaves naive / ours / bound) then has idle sessions'
workers spinning on the cores the running session needs; on a small machine (2 cores)
this made the same model 1.6 ms or 20 ms depending on the session (conv net, T=64,
batch 1).  :func:`use_shared_thread_pool` gives all sessions of the process ONE pool
(``set_global_thread_pool_sizes`` + ``use_per_session_threads = False``), i.e. what a
deployment with a single session gets; the benchmark uses it.  Sizes are onnxruntime's
defaults unless ``threads`` is given.
"""

from __future__ import annotations

_SHARED_POOL: dict = {}

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_OPTIONS = {"cpu": {}, "cuda": {"use_tf32": "0"}}


def provider_available(provider: str) -> bool:
    import onnxruntime as ort

    return PROVIDERS[provider] in ort.get_available_providers()


def use_shared_thread_pool(threads: int = 0) -> bool:
    """Make later :func:`make_session` sessions of this process share one thread pool (module docstring).

    Returns whether the shared pool is in use; idempotent (the first size wins).
    """
    if "on" not in _SHARED_POOL:
        try:
            from onnxruntime.capi import onnxruntime_pybind11_state as C

            C.set_global_thread_pool_sizes(threads, 1)
            _SHARED_POOL["on"] = True
        except Exception:  # an onnxruntime without it: per-session pools as before
            _SHARED_POOL["on"] = False
    return _SHARED_POOL["on"]


def make_session(model, provider: str = "cpu", threads: int = 0, fallback_to_cpu: bool = False):
    """A session on ``provider`` (``model``: path or serialized bytes), all graph optimisations.

    ``fallback_to_cpu`` lets onnxruntime place nodes the provider lacks on the CPU; parity
    checks leave it off so a provider is never silently replaced.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if _SHARED_POOL.get("on"):
        options.use_per_session_threads = False  # the process-wide pool (its size set once)
    elif threads:
        options.intra_op_num_threads = threads
    providers = [(PROVIDERS[provider], PROVIDER_OPTIONS[provider])]
    if fallback_to_cpu and provider != "cpu":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), options, providers=providers)

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

import numpy as np

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


def make_session(model, provider: str = "cpu", threads: int = 0, fallback_to_cpu: bool = False, cuda_graph: bool = False,
                 memory_arena: bool = True):
    """A session on ``provider`` (``model``: path or serialized bytes), all graph optimisations.

    ``memory_arena=False``: host memory without onnxruntime's arena, for a single run of a
    long sequence (the arena keeps every intermediate's block while any output lives:
    1.38 GB against 0.80 GB for a 784-1000-10 MLP at 100,000 sample-steps).

    ``fallback_to_cpu`` lets onnxruntime place nodes the provider lacks on the CPU; parity
    checks leave it off so a provider is never silently replaced.  ``cuda_graph``: record
    the run as a CUDA graph and replay it (a ``convert --cuda-graph`` file, run through
    :class:`GraphRunner`); every node must then be on the GPU.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = memory_arena
    if _SHARED_POOL.get("on"):
        options.use_per_session_threads = False  # the process-wide pool (its size set once)
    elif threads:
        options.intra_op_num_threads = threads
    provider_options = dict(PROVIDER_OPTIONS[provider])
    if cuda_graph:
        if provider != "cuda":
            raise ValueError("CUDA graphs need the cuda provider")
        provider_options["enable_cuda_graph"] = "1"
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    providers = [(PROVIDERS[provider], provider_options)]
    if fallback_to_cpu and provider != "cpu":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), options, providers=providers)


class GraphRunner:
    """Runs a CUDA-graph session (:func:`make_session` with ``cuda_graph``) as onnxruntime
    requires: input and outputs bound to device buffers that never move.

    ``run(x)`` copies ``x`` into the input buffer, replays the graph (the first runs
    capture it) and returns the outputs copied to the host, as ``session.run`` would.
    ``device`` "cpu" runs the same binding on a CPU session (tests on machines without a GPU).
    """

    def __init__(self, session, x, device: str = "cuda"):
        import onnxruntime as ort

        self.session = session
        self.binding = session.io_binding()
        name = session.get_inputs()[0].name
        self.input = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(x), device, 0)
        self.binding.bind_ortvalue_input(name, self.input)
        self.outputs, self._blanks = [], []  # the device buffers, and what clear_outputs fills them with
        for out in session.get_outputs():  # a static build: every output shape is known
            shape = [d if isinstance(d, int) else None for d in out.shape]
            if None in shape:
                raise ValueError(f"output {out.name} has no static shape {out.shape}; CUDA graphs need a static build")
            if out.type not in _NUMPY_TYPES:
                raise ValueError(f"output {out.name} is a {out.type}, which GraphRunner does not bind")
            self.outputs.append(ort.OrtValue.ortvalue_from_shape_and_type(shape, _NUMPY_TYPES[out.type], device, 0))
            self.binding.bind_ortvalue_output(out.name, self.outputs[-1])
            self._blanks.append(np.full(shape, np.nan if np.dtype(_NUMPY_TYPES[out.type]).kind == "f" else 0, _NUMPY_TYPES[out.type]))

    def warm_up(self, runs: int = 3) -> "GraphRunner":
        """Run a few times: onnxruntime first runs the graph normally, then captures it."""
        for _ in range(runs):
            self.replay()
        return self

    def clear_outputs(self) -> None:
        """Fill the output buffers with NaN (zeros for integers): a replay that skipped work shows."""
        for o, blank in zip(self.outputs, self._blanks):
            o.update_inplace(blank)

    def replay(self) -> None:
        """One run on the bound buffers, nothing copied to or from the host."""
        self.session.run_with_iobinding(self.binding)

    def run(self, x=None) -> list:
        if x is not None:
            self.input.update_inplace(np.ascontiguousarray(x))
        self.replay()
        return [o.numpy() for o in self.outputs]


_NUMPY_TYPES = {f"tensor({name})": dtype for name, dtype in (
    ("float", np.float32), ("double", np.float64), ("float16", np.float16), ("int64", np.int64), ("int32", np.int32),
    ("int8", np.int8), ("uint8", np.uint8), ("bool", np.bool_))}

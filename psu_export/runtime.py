"""onnxruntime sessions: the one place for provider names and their settings.

The CUDA provider computes float32 matrix products and convolutions in TF32 by default
on Ampere and newer GPUs (10-bit mantissa inputs).  That moves membranes across the
threshold and changes spikes (measured on an H200: 99.95% spike agreement with TF32 on),
so sessions for parity and benchmarks turn it off.  Deploy with the same setting
(``use_tf32=0``) to keep the parity that verify reported.
"""

from __future__ import annotations

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
PROVIDER_OPTIONS = {"cpu": {}, "cuda": {"use_tf32": "0"}}


def provider_available(provider: str) -> bool:
    import onnxruntime as ort

    return PROVIDERS[provider] in ort.get_available_providers()


def make_session(model, provider: str = "cpu", threads: int = 0, fallback_to_cpu: bool = False):
    """A session on ``provider`` (``model``: path or serialized bytes), all graph optimisations.

    ``fallback_to_cpu`` lets onnxruntime place nodes the provider lacks on the CPU; parity
    checks leave it off so a provider is never silently replaced.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers = [(PROVIDERS[provider], PROVIDER_OPTIONS[provider])]
    if fallback_to_cpu and provider != "cpu":
        providers.append(("CPUExecutionProvider", {}))
    return ort.InferenceSession(model if isinstance(model, (bytes, str)) else str(model), options, providers=providers)

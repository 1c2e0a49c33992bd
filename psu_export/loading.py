"""Load: a model from ``module:factory`` (+ ``--weights`` state dict) or a pickled ``.pt``.

Pickles are loaded with ``torch.load(weights_only=True)`` and an allowlist of classes
(torch.nn, the supported frameworks, psu_export) unless the user passes
``--trust-model``; a refused class is named in the error together with the safe
factory + state-dict route.  State dicts are always loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pickle
import pickletools
import zipfile
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UsageError, one_line

#: module prefixes whose classes may be unpickled without --trust-model
SAFE_MODULE_PREFIXES = ("torch.nn.", "snntorch.", "spikingjelly.", "norse.", "psu_export.")


@dataclass
class LoadedModel:
    """A model ready for capture, and a description of where it came from."""

    module: torch.nn.Module
    source: str


def _import_factory(spec: str):
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise UsageError(f"MODEL {spec!r} is not of the form module:factory, path/to/file.py:factory or file.pt.")
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise UsageError(f"The model file {target} does not exist.")
            name = f"_psu_user_{path.stem}"
            mod_spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[name] = module
            sys.path.insert(0, str(path.parent.resolve()))
            try:
                mod_spec.loader.exec_module(module)
            finally:
                sys.path.remove(str(path.parent.resolve()))
        else:
            if str(Path.cwd()) not in sys.path:
                sys.path.insert(0, str(Path.cwd()))
            module = importlib.import_module(target)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"Could not import {target!r} for MODEL {spec!r}: {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise UsageError(f"{target!r} has no callable {attr!r} (MODEL {spec!r}).")
    return factory


def pickle_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle (or a torch zip checkpoint) refers to, read
    statically from its opcodes: nothing in the file is executed."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            blobs = [archive.read(n) for n in archive.namelist() if n.endswith(".pkl")]
    else:
        blobs = [path.read_bytes()]
    names: list[str] = []
    for blob in blobs:
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(blob):
                if opcode.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
        except Exception as exc:
            raise UsageError(f"{path} is not a readable pickle or torch checkpoint ({type(exc).__name__}: {exc}).") from exc
    return list(dict.fromkeys(names))


def _torch_default_allowlist() -> set[str]:
    """What ``torch.load(weights_only=True)`` admits by itself (tensors, storages, dtypes, ...)."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return set(_get_allowed_globals())


def _load_restricted(path: Path):
    """``torch.load(weights_only=True)`` admitting only allowlisted classes; the first class
    off the allowlist is refused by name (DESIGN.md: never unpickle untrusted code)."""
    allowed = []
    torch_safe = _torch_default_allowlist()
    for name in pickle_globals(path):
        name = name.replace("__builtin__.", "builtins.")
        if name in torch_safe:
            continue
        if not (name.rpartition(".")[0] + ".").startswith(SAFE_MODULE_PREFIXES):
            raise UsageError(
                f"{path} needs the class or function {name!r} to be unpickled, which is not on the allowlist "
                "(torch.nn, snntorch, spikingjelly, norse, psu_export). Unpickling it could run arbitrary code. "
                "If you trust the file, pass --trust-model; safer, save a state dict "
                "(torch.save(model.state_dict(), ...)) and load it with MODEL=module:factory --weights FILE."
            )
        module_name, _, attr = name.rpartition(".")
        try:
            obj = importlib.import_module(module_name)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except Exception as exc:
            raise UsageError(f"{path} refers to {name!r}, which cannot be imported here ({exc}); is the framework installed?") from exc
        allowed.append(obj)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def load_state_dict(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"The weights file {path} does not exist or is not a file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{path} is not a plain state dict that can be loaded safely ({str(exc).splitlines()[0]}).") from exc
    except Exception as exc:
        raise UsageError(f"Could not read the weights file {path}: {one_line(exc)}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"{path} does not contain a state dict (a mapping of names to tensors).")
    return state


def load_model(spec: str, weights: str | None = None, trust_model: bool = False, nir_dt: float | None = None, nir_reset: str = "zero") -> LoadedModel:
    """Load MODEL as described in the CLI contract; the module is put in eval mode.

    ``nir_dt`` / ``nir_reset``: the discretisation of a ``.nir`` graph (``--dt``, ``--nir-reset``).
    """
    path = Path(spec)
    if spec.endswith(".nir") and ":" not in spec:
        from .nir_import import DEFAULT_DT, load_nir

        module = load_nir(path, nir_dt, nir_reset)
        return LoadedModel(module, f"nir:{path.name} dt={DEFAULT_DT if nir_dt is None else nir_dt:g} reset={nir_reset}")
    if spec.endswith((".pt", ".pth")) and ":" not in spec:
        if not path.is_file():
            raise UsageError(f"The model file {spec} does not exist.")
        try:
            if trust_model:
                module = torch.load(path, map_location="cpu", weights_only=False)
            else:
                module = _load_restricted(path)
        except UsageError:
            raise
        except Exception as exc:
            raise UsageError(f"Could not load the model file {spec}: {one_line(exc)}") from exc
        if isinstance(module, dict):
            raise UsageError(f"{spec} holds a state dict, not a model: pass MODEL=module:factory --weights {spec}.")
        if not isinstance(module, torch.nn.Module):
            raise UsageError(f"{spec} does not contain a torch.nn.Module (found {type(module).__name__}).")
        source = f"pickle:{path.name}"
    else:
        factory = _import_factory(spec)
        try:
            module = factory()
        except Exception as exc:
            raise UsageError(f"The factory {spec} raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(module, torch.nn.Module):
            raise UsageError(f"The factory {spec} returned {type(module).__name__}, not a torch.nn.Module.")
        source = f"factory:{spec}"
        if weights:
            state = load_state_dict(weights)
            try:
                module.load_state_dict(state)
            except RuntimeError as exc:
                raise UsageError(f"The weights {weights} do not fit the model from {spec}: {str(exc).strip()}") from exc
            source += f" weights:{Path(weights).name}"
    module.eval()
    return LoadedModel(module, source)

"""Seeds, device resolution, logging and progress bars (one place for each)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import random

import numpy as np
import torch

from synth.errors import DeviceError
from synth.progress import progress, set_quiet  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)



def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """Resolve ``auto|cpu|cuda|cuda:N`` to a torch.device (DeviceError if unavailable).

    Example:
        >>> resolve_device("cpu")
        device(type='cpu')
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(f"device '{name}' requested but CUDA is not available here; use 'auto' or 'cpu'")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device '{name}' does not exist ({torch.cuda.device_count()} CUDA devices)")
        return dev
    raise DeviceError(f"unknown device '{name}'; expected auto, cpu, cuda or cuda:N")


@functools.lru_cache(maxsize=None)
def _cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none, e.g. macOS)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (so bf16 autocast is faster, not emulated).

    CUDA: ``torch.cuda.is_bf16_supported()``. CPU: the AVX512-BF16 or AMX-BF16 flag
    (x86 Linux); other CPUs count as not native.
    """
    dev = resolve_device(device)
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if dev.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def resolve_precision(precision: str, device: str | torch.device) -> str:
    """Resolve a ``precision`` setting for ``device``: ``auto`` is bf16 where it is native, else fp32.

    An explicit ``bf16`` where it is emulated is kept (with a warning: it is slower there);
    ``fp16`` applies to CUDA only and is fp32 elsewhere.

    Example:
        >>> resolve_precision("fp32", "cpu")
        'fp32'
    """
    if precision == "fp16" and resolve_device(device).type != "cuda":
        log.info("precision fp16 applies to CUDA only; running fp32 on %s", device)
        return "fp32"
    if precision != "auto":
        if precision == "bf16" and not native_bf16(device):
            _warn_emulated_bf16(str(device))
        return precision
    return "bf16" if native_bf16(device) else "fp32"


@functools.lru_cache(maxsize=None)
def _warn_emulated_bf16(device: str) -> None:
    """Warn once per device that an explicit bf16 setting is emulated there."""
    log.warning("precision bf16 on %s: bfloat16 is emulated here (slower than fp32); consider fp32 or auto", device)


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved ``precision`` (fp32: none; bf16; fp16) on ``device``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=resolve_device(device).type, dtype=dtype)


def derive_seed(seed: int, *names: object) -> int:
    """Derive a stable 31-bit seed from a base seed and names (stage, site, index...).

    The same inputs always give the same seed, on every machine and Python version.
    """
    h = hashlib.sha256(repr((int(seed),) + tuple(str(n) for n in names)).encode()).digest()
    return int.from_bytes(h[:4], "little") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (code should still prefer explicit ones)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def torch_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """An explicit, seeded torch.Generator on ``device``."""
    g = torch.Generator(device=device)
    g.manual_seed(int(seed))
    return g


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def array_sha256(*arrays: np.ndarray) -> str:
    """SHA-256 of arrays' bytes, shapes and dtypes (for cache keys and provenance)."""
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.shape, a.dtype.str)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def versions() -> dict[str, str]:
    """Versions of synth and its main dependencies (recorded in every run folder)."""
    import platform

    import scipy
    import torchvision

    import synth

    out = {
        "synth": synth.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
    }
    try:
        import kornia

        out["kornia"] = kornia.__version__
    except Exception:  # pragma: no cover - optional at import time
        pass
    return out

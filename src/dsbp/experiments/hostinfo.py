"""What a CPU result depends on besides the code: the CPU's vector units and torch's BLAS.

The same commit, seed and data can give different numbers on two x86 machines: torch picks its
kernels by the vector instructions the CPU has (AVX2, AVX-512, AMX), and MKL / oneDNN pick
different blockings and summation orders on each. ``env.json`` records both, so two results
that differ can be traced to the machine:

- ``cpu_vector``: the widest vector extension listed in ``/proc/cpuinfo`` (``AVX-512``,
  ``AVX2``, ``AVX``, ``SSE4.2`` or ``unknown``), with ``+AMX`` when the AMX tiles are there;
- ``cpu_vector_flags``: the vector-related flags themselves (avx*, fma, sse4*, amx*);
- ``torch_cpu_capability``: the kernel set torch dispatches to
  (``torch.backends.cpu.get_cpu_capability()``, e.g. ``AVX512``; ``ATEN_CPU_CAPABILITY``
  can lower it);
- ``blas`` / ``lapack``: ``BLAS_INFO`` and ``LAPACK_INFO`` of ``torch.__config__.show()``
  (e.g. ``mkl``, ``open``), and ``blas_version``: the MKL / OpenBLAS line of it when present.
"""

from __future__ import annotations

import re
from typing import Any

import torch

_VECTOR_FLAG = re.compile(r"^(avx.*|fma.?|sse4.*|amx.*)$")


def cpu_flags(path: str = "/proc/cpuinfo") -> list[str]:
    """The ``flags`` of the first CPU in ``path`` (empty where there is no such file)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def vector_level(flags: list[str]) -> str:
    """The widest x86 vector extension among ``flags``, ``+AMX`` when AMX tiles are there."""
    have = set(flags)
    level = ("AVX-512" if "avx512f" in have else "AVX2" if "avx2" in have else
             "AVX" if "avx" in have else "SSE4.2" if "sse4_2" in have else "unknown")
    return level + (" +AMX" if "amx_tile" in have else "")


def blas_info(config: str | None = None) -> dict[str, str]:
    """``blas``, ``lapack`` and ``blas_version`` read from ``torch.__config__.show()``."""
    text = config if config is not None else torch.__config__.show()
    out = {}
    for key, name in (("BLAS_INFO", "blas"), ("LAPACK_INFO", "lapack")):
        m = re.search(rf"{key}=([^,\s]+)", text)
        out[name] = m.group(1) if m else "unknown"
    lib = re.search(r"^\s*-\s*(.*(?:Math Kernel Library|OpenBLAS|BLIS|Accelerate).*)$", text,
                    re.MULTILINE)
    out["blas_version"] = lib.group(1).strip() if lib else ""
    return out


def compute_info() -> dict[str, Any]:
    """The entries ``env.json`` gets: ``cpu_vector``, ``cpu_vector_flags``,
    ``torch_cpu_capability``, ``blas``, ``lapack``, ``blas_version`` (see the module doc)."""
    flags = cpu_flags()
    try:
        capability = str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):  # pragma: no cover - old torch
        capability = "unknown"
    return {"cpu_vector": vector_level(flags),
            "cpu_vector_flags": sorted(f for f in flags if _VECTOR_FLAG.match(f)),
            "torch_cpu_capability": capability, **blas_info()}


__all__ = ["blas_info", "compute_info", "cpu_flags", "vector_level"]

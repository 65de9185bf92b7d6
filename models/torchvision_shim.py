"""Make a CUDA build of torchvision importable beside a CPU-only torch.

PyPI's torchvision is a CUDA build; next to `torch+cpu` its compiled ops never register and importing it dies
with "operator torchvision::nms does not exist". vLLM's and transformers' image code imports torchvision
only for pure-torch transforms, so registering an empty `torchvision._meta_registrations` is enough. The
ABI-incompatible torchaudio/torchcodec wheels are hidden the same way. Applied only when that exact
mismatch is detected; on a matching install (every GPU machine) it does nothing.
"""

from __future__ import annotations

import os
import sys
import types
from importlib import metadata
from pathlib import Path

_SITE_DIR = str(Path(__file__).with_name("cpu_site"))


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_torch_with_cuda_torchvision() -> bool:
    torch_v, vision_v = _version("torch"), _version("torchvision")
    if torch_v is None or vision_v is None:
        return False
    return torch_v.endswith("+cpu") and not vision_v.endswith("+cpu")


def apply() -> bool:
    """Install the shim if needed (idempotent); returns whether it is active."""
    if not cpu_torch_with_cuda_torchvision():
        return False
    if "torchvision" not in sys.modules:
        sys.modules.setdefault(
            "torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations")
        )
    for name in ("torchaudio", "torchcodec"):
        if _version(name) is not None:
            sys.modules.setdefault(name, None)
    # Child processes (vLLM's model inspection, engine workers) get it through a sitecustomize module.
    paths = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if _SITE_DIR not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([_SITE_DIR, *filter(None, paths)])
    return True

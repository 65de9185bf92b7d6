"""Models: the denoisers, objectives, encoders, captioners and the tiny models of the embedded default.

Importing this package applies the torchvision shim (`t2i.models.torchvision_shim`) before any of its modules
imports torch, transformers, diffusers or vLLM; every entry point reaches those libraries only through here
(child processes, such as vLLM's, get it from `cpu_site/sitecustomize.py`, which the shim puts on their path).
"""

from t2i.models import torchvision_shim as _torchvision_shim

_torchvision_shim.apply()

"""The torchvision shim carried into child Python processes (vLLM inspects models in a subprocess).

Only on PYTHONPATH when `t2i.models.torchvision_shim` detected the CPU-torch / CUDA-torchvision mismatch.
"""

from t2i.models.torchvision_shim import apply

apply()

# Carries the torchvision shim into child Python processes (vLLM inspects models in a subprocess).
# Only on PYTHONPATH when models.torchvision_shim detected the CPU-torch / CUDA-torchvision mismatch.
from models.torchvision_shim import apply

apply()

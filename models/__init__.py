from t2i.models import torchvision_shim as _torchvision_shim

_torchvision_shim.apply()

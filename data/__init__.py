"""Data: sources, the shapes world, shards on disk and their claims, CutMix, caption sets and train tables.

Nothing here imports torchvision or a library that does, so the torchvision shim (`t2i.models`) is not needed.
"""

"""The version of every output the pipeline fingerprints: bump a number when its code writes different outputs
for the same inputs and config, so old artifacts are never reused as new ones.

One place for all of them, importable without torch or Prefect: `t2i.flows.plan` and `t2i status` read the
stage versions, the data and model code read their own.
"""

# The stages' outputs (`t2i.flows.plan`).
# 2: folder and hf shards hold a seeded shuffle of the listing, and max_images samples it (1: the sorted
# listing, cut to the first max_images). The shapes world is generated in order as before, so its artifacts
# keep fingerprinting with SHAPES_DOWNLOAD and stay valid.
DOWNLOAD = 2
SHAPES_DOWNLOAD = 1
CUTMIX = 1
RECAPTION = 2
LATENTS = 1
TEXT = 1
TRAIN = 1
EVALUATE = 1
ABLATION = 1  # the ablation's report (`t2i ablate`)
GENERATE = 1  # the folder `t2i generate` writes a request's images to

# What those outputs are made of.
TRAIN_TABLE = 2  # the train table (`t2i.data.train_data`); 2: keys and captions as UTF-8 blobs with offsets
SHAPES_WORLD = 1  # the shapes world's scenes and rendering (`t2i.data.shapes`), in the download identity
# 2: CAD-I is the paper's network (RINTextCond / CADRINTextCond, weights convertible both ways); runs of the
# earlier CAD-I have other weights and fingerprint without it. DiT-I runs are untouched.
CAD = 2
TINY_MODELS = 3  # the builders of the `tiny:*` models (`t2i.models.tiny`), in every fingerprint that uses one
IMPORT = 1  # a train run made from released weights (`t2i import-model`)

"""Each stage's output version, part of every fingerprint: bump a stage's number when it writes different
outputs for the same inputs and config, so old artifacts are never reused as new ones. Kept apart from the
stage code so that planning and `t2i status` import neither torch nor Prefect."""

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

"""Image-set metrics: FID, KID, Inception Score and precision/recall through torch-fidelity; CLIPScore.

torch-fidelity is the maintained implementation whose Inception matches the TF graph the published numbers
come from, so this module only adapts inputs to it and never re-implements a metric. Nothing here downloads:
the Inception weights and the CLIP checkpoint are local files named by the config. Where those weights are
absent, a fixed random conv net (`feature_extractor="small"`) gives FID/KID/PRC that rank runs of this
pipeline against each other but are not Inception FID, and say so in the result.
"""

from __future__ import annotations

import t2i.models  # noqa: F401  (the torchvision shim: torch_fidelity and transformers import torchvision)

# isort: split
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from PIL import Image
from torch import nn
from torch.utils.data import Dataset
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from t2i.tasks.model_cache import pick_device

ImageLike = Image.Image | np.ndarray

INCEPTION_EXTRACTOR = "inception-v3-compat"  # torch-fidelity's name for the TF-FID InceptionV3
SMALL_EXTRACTOR = "t2i-small-convnet-v1"  # bump the suffix if the net changes: old numbers stop comparing
SMALL_NOTE = (
    "FID/KID/precision/recall on features of a fixed random conv net, not Inception: comparable only with "
    "other feature_extractor='small' numbers from this code, never with published FID."
)
INCEPTION_NOTE = (
    "Inception (TF-FID weights) pool3 features for FID/KID/precision/recall, logits for IS; precision/recall "
    "on Inception rather than the paper's VGG-16 features."
)


class ImageSet(Dataset):
    """In-memory images as the uint8 CHW tensors torch-fidelity takes; converted one at a time on access."""

    def __init__(self, images: Sequence[ImageLike], name: str):
        self.images = list(images)
        sizes = {_height_width(im) for im in self.images}
        if len(sizes) > 1:  # a batch must stack; how to resize is the caller's choice since FID notices it
            raise ValueError(
                f"{name}: images of several sizes {sorted(sizes)}; resize them to one size first"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.tensor(_rgb_array(self.images[index])).permute(2, 0, 1).contiguous()


def _height_width(image: ImageLike) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.height, image.width
    return tuple(image.shape[:2])


def _rgb_array(image: ImageLike) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return image


class SmallConvFeatures(torch_fidelity.FeatureExtractorBase):
    """A seeded, randomly initialised conv net: features that need no download, for FID/KID/PRC on CPU.

    Random conv features still separate image distributions (the kernel-two-sample literature relies on
    this), but their scale has nothing to do with Inception's, hence the separate name and note.
    """

    INPUT_SIZE = 64
    WIDTHS = (32, 64, 128)
    SEED = 0

    def __init__(self, name: str, features_list: list[str], **kwargs: Any):  # kwargs: all of torch-fidelity's
        super().__init__(name, features_list)
        generator = torch.Generator().manual_seed(self.SEED)
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in self.WIDTHS:
            conv = nn.Conv2d(c_in, c_out, kernel_size=3, stride=2, padding=1)
            # He init from a private generator: the same weights whatever the global RNG state.
            nn.init.normal_(conv.weight, std=math.sqrt(2.0 / (c_in * 9)), generator=generator)
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU()]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return ("pool",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"fid": "pool", "kid": "pool", "prc": "pool"}[metric]  # no logits, so no Inception Score

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = x.float()
        if x.shape[-2:] != (self.INPUT_SIZE, self.INPUT_SIZE):  # one scale, so set sizes may differ
            size = (self.INPUT_SIZE, self.INPUT_SIZE)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        h = self.body(x / 127.5 - 1.0)
        return (h.mean(dim=(2, 3)),)


if SMALL_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:  # registering twice is an error in torch-fidelity
    torch_fidelity.register_feature_extractor(SMALL_EXTRACTOR, SmallConvFeatures)


def inception_weights_file(path: str | Path | None) -> str:
    if path is not None and Path(path).expanduser().is_file():
        return str(Path(path).expanduser())
    where = "is not set" if path is None else f"{path} does not exist"
    raise FileNotFoundError(
        f"evaluate.inception_weights {where}. FID/KID/IS with feature_extractor='inception' need the TF-FID "
        f"InceptionV3 weights, and evaluation never downloads: fetch them once from {URL_INCEPTION_V3} "
        "(pytorch-fid's pt_inception-2015-12-05-6726825d.pth has the same layout) and pass the file's path "
        "as evaluate.inception_weights, or use feature_extractor='small' for numbers that only compare runs "
        "of this pipeline."
    )


def fidelity_metrics(
    real: Sequence[ImageLike],
    fake: Sequence[ImageLike],
    *,
    feature_extractor: Literal["inception", "small"] = "inception",
    inception_weights: str | Path | None = None,
    kid_subset_size: int = 1000,
    prc_neighborhood: int = 3,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, Any]:
    """FID, KID and precision/recall of `fake` against `real` (plus IS of `fake` on Inception).

    KID's subset size and IS's split count are clamped to the sample counts so small sets still work;
    the values used are returned, since both change the numbers.
    """
    if feature_extractor not in ("inception", "small"):
        raise ValueError(f"feature_extractor must be 'inception' or 'small', got {feature_extractor!r}")
    inception = feature_extractor == "inception"
    weights = inception_weights_file(inception_weights) if inception else None
    smallest = max(2, prc_neighborhood + 1)  # a covariance needs 2; the k-NN radius needs k + 1
    if min(len(real), len(fake)) < smallest:
        raise ValueError(f"need at least {smallest} real and fake images, got {len(real)} and {len(fake)}")
    run_on = torch.device(pick_device(device))
    if run_on.type not in ("cpu", "cuda"):
        raise ValueError(f"torch-fidelity runs on cpu or cuda, not {device!r}")

    subset = min(kid_subset_size, len(real), len(fake))
    isc_splits = min(10, len(fake))
    kwargs = dict(
        input1=ImageSet(fake, "fake"),  # torch-fidelity's convention: input1 generated, input2 real
        input2=ImageSet(real, "real"),
        feature_extractor=INCEPTION_EXTRACTOR if inception else SMALL_EXTRACTOR,
        feature_extractor_weights_path=weights,
        isc=inception,
        fid=True,
        kid=True,
        prc=True,
        isc_splits=isc_splits,
        kid_subset_size=subset,
        prc_neighborhood=prc_neighborhood,
        batch_size=batch_size,
        cuda=run_on.type == "cuda",
        save_cpu_ram=True,  # no DataLoader worker processes for tensors already in memory
        cache=False,  # its cache is keyed by input name; ours are anonymous in-memory sets
        verbose=False,
    )
    if run_on.type == "cuda":
        with torch.cuda.device(run_on):  # torch-fidelity only knows `.cuda()`, i.e. the current device
            raw = torch_fidelity.calculate_metrics(**kwargs)
    else:
        raw = torch_fidelity.calculate_metrics(**kwargs)

    out: dict[str, Any] = {
        "feature_extractor": feature_extractor,
        "fid": raw[torch_fidelity.KEY_METRIC_FID],
        "kid_mean": raw[torch_fidelity.KEY_METRIC_KID_MEAN],
        "kid_std": raw[torch_fidelity.KEY_METRIC_KID_STD],
        "precision": raw[torch_fidelity.KEY_METRIC_PRECISION],
        "recall": raw[torch_fidelity.KEY_METRIC_RECALL],
        "f_score": raw[torch_fidelity.KEY_METRIC_F_SCORE],
    }
    if inception:
        out["isc_mean"] = raw[torch_fidelity.KEY_METRIC_ISC_MEAN]
        out["isc_std"] = raw[torch_fidelity.KEY_METRIC_ISC_STD]
        out["isc_splits"] = isc_splits
    out |= {
        "num_real": len(real),
        "num_fake": len(fake),
        "kid_subset_size": subset,
        "prc_neighborhood": prc_neighborhood,
        "torch_fidelity": torch_fidelity.__version__,
        "note": INCEPTION_NOTE if inception else SMALL_NOTE,
    }
    return out


def clip_score(
    images: Sequence[ImageLike],
    prompts: Sequence[str],
    model_path: str | Path,
    batch_size: int = 32,
    device: str = "cpu",
) -> float:
    """CLIPScore (Hessel et al. 2021) as most T2I papers report it: mean of 100 * max(cos(image, text), 0).

    Prompts longer than the text encoder's positions are truncated rather than rejected, as the paper does.
    """
    from transformers import CLIPModel, CLIPProcessor

    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise ValueError("no images to score")
    run_on = pick_device(device)
    model = CLIPModel.from_pretrained(model_path, local_files_only=True).to(run_on).eval()
    processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    max_length = model.config.text_config.max_position_embeddings
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            batch = processor(
                text=list(prompts[start : start + batch_size]),
                images=[Image.fromarray(_rgb_array(im)) for im in images[start : start + batch_size]],
                padding=True,
                truncation=True,
                max_length=max_length,
                return_tensors="pt",
            ).to(run_on)
            image_features = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
            text_features = model.get_text_features(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).pooler_output
            cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
            total += (100.0 * cos.clamp(min=0)).sum().item()
    return total / len(images)

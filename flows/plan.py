"""Where every stage's artifact lives for a given config: fingerprints chained from the inputs down.

One source of truth for paths: the stage flows, `t2i status` and the deployments all ask the plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from t2i.data import versions
from t2i.data.caption_sets import source_identity
from t2i.data.listing import SourceSummary, is_listed, item_order, num_shards, open_listed, source_summary
from t2i.data.sources import ShapesSource, Source
from t2i.data.store import Artifact, fingerprint
from t2i.flows.config import PipelineConfig
from t2i.models.loading import initial_run_meta, train_run
from t2i.models.tiny import tiny_identities

STAGES = ("download", "cutmix", "recaption", "latents", "train", "evaluate")
UPSTREAM = {
    "download": (),
    "cutmix": ("download",),
    "recaption": ("download", "cutmix"),
    "latents": ("download", "cutmix"),
    "train": ("latents", "recaption"),
    "evaluate": ("train",),
}


class MissingInput(RuntimeError):
    """A stage's input artifact is not complete; the message names the command that makes it."""


@dataclass
class Plan:
    cfg: PipelineConfig
    relist: bool = False  # list the source again instead of using the workspace's cached listing

    @functools.cached_property
    def source_summary(self) -> SourceSummary | None:
        """The listed source (folder, dataset) from the workspace's cache; None for the generated shapes.
        Only the small summary is read: the plan never opens the raw source once it has been listed."""
        d = self.cfg.download
        if not is_listed(d.source):
            return None
        return source_summary(
            self.cfg.workspace_path,
            d.source,
            d.split,
            d.hf_revision,
            relist=self.relist,
            wds_class=d.wds_class,
        )

    def _artifact(self, stage: str, version: int, config: dict, inputs: dict[str, str]) -> Artifact:
        pinned = tiny_identities(config)  # a rebuilt or retrained tiny model makes new outputs
        fp = fingerprint(stage, version, {**config, "tiny_models": pinned} if pinned else config, inputs)
        return Artifact(self.cfg.workspace_path, stage, fp, extra={"config": config, "inputs": inputs})

    @functools.cached_property
    def images(self) -> Artifact:
        config = self.cfg.download.fingerprint_fields()
        if self.source_summary is None:
            config["source_identity"] = self._shapes().identity()
            return self._artifact("download", versions.SHAPES_DOWNLOAD, config, {})
        config["source_identity"] = self.source_summary.identity()
        return self._artifact("download", versions.DOWNLOAD, config, {})

    @property
    def num_images(self) -> int:
        d, summary = self.cfg.download, self.source_summary
        if summary is None:
            return int(d.max_images or 0)
        return min(d.max_images or summary.count, summary.count)

    @property
    def num_shards(self) -> int:
        return num_shards(self.num_images, self.cfg.download.shard_size)

    def item_order(self) -> np.ndarray:
        """Source indices in shard order (a seeded shuffle of a listed source): the download stage's input."""
        summary = self.source_summary
        count = self.num_images if summary is None else summary.count
        d = self.cfg.download
        return item_order(count, d.seed, d.max_images, shuffle=summary is not None)

    def open_source(self) -> Source:
        """The raw source, for the download stage only (every other stage reads the workspace)."""
        d, summary = self.cfg.download, self.source_summary
        if summary is None:
            return self._shapes()
        return open_listed(self.cfg.workspace_path, summary, d.source, d.split, d.hf_revision)

    def _shapes(self) -> ShapesSource:
        d = self.cfg.download
        return ShapesSource(self.num_images, seed=d.seed, split=d.split)

    @functools.cached_property
    def composites(self) -> Artifact | None:
        """CutMix composites of the images (an images artifact of their own), or None when disabled."""
        if not self.cfg.cutmix.enabled:
            return None
        cfg = self.cfg.cutmix.fingerprint_fields()
        cfg.pop("enabled")
        return self._artifact("cutmix", versions.CUTMIX, cfg, {"images": self.images.fingerprint})

    def captions_of(self, images: Artifact) -> Artifact:
        cfg = self.cfg.recaption.fingerprint_fields()
        if self.cfg.recaption.backend == "import":
            cfg["source_identity"] = source_identity(str(self.cfg.recaption.captions_source))
        return self._artifact("recaption", versions.RECAPTION, cfg, {"images": images.fingerprint})

    def latents_of(self, images: Artifact) -> Artifact:
        cfg = self.cfg.latents.fingerprint_fields()
        return self._artifact("latents", versions.LATENTS, cfg, {"images": images.fingerprint})

    def text_of(self, captions: Artifact) -> Artifact | None:
        """Precomputed text embeddings of a captions artifact (made by the latents stage), or None online."""
        if self.cfg.text.mode != "precomputed":
            return None
        cfg = self.cfg.text.fingerprint_fields()
        cfg.pop("mode")
        return self._artifact("text", versions.TEXT, cfg, {"captions": captions.fingerprint})

    @functools.cached_property
    def captions(self) -> Artifact:
        return self.captions_of(self.images)

    @functools.cached_property
    def latents(self) -> Artifact:
        return self.latents_of(self.images)

    def image_sets(self) -> list[tuple[str, Artifact]]:
        """The image artifacts that recaption and latents process: the images, then the composites."""
        sets = [("download", self.images)]
        if self.composites is not None:
            sets.append(("cutmix", self.composites))
        return sets

    def train_table_of(self, latents: Artifact, captions: Artifact, text: Artifact | None) -> Artifact:
        """Where the train table joining these inputs lives (`t2i.data.train_data`): its fingerprint is theirs
        alone, so it is built once per input set, whatever trains on it."""
        inputs = {"latents": latents.fingerprint, "captions": captions.fingerprint}
        if text is not None:
            inputs["text"] = text.fingerprint
        fp = fingerprint("train-data", versions.TRAIN_TABLE, {}, inputs)
        return Artifact(self.cfg.workspace_path, "train-data", fp)

    @functools.cached_property
    def checkpoints(self) -> Artifact:
        cfg = {"train": self.cfg.train.fingerprint_fields(), "text": self.cfg.text.fingerprint_fields()}
        if self.cfg.train.model == "cad":
            cfg["cad"] = versions.CAD
        inputs = {"latents": self.latents.fingerprint, "captions": self.captions.fingerprint}
        if self.composites is not None:
            inputs["composite_latents"] = self.latents_of(self.composites).fingerprint
            inputs["composite_captions"] = self.captions_of(self.composites).fingerprint
        if self.initial_run is not None:
            inputs["init"] = self.initial_run.fingerprint
        return self._artifact("train", versions.TRAIN, cfg, inputs)

    @functools.cached_property
    def initial_run(self) -> Artifact | None:
        """The finished run a fine-tuning run starts from (`train.init_from`), else None."""
        ref = self.cfg.train.init_from
        if ref is None:
            return None
        run = train_run(ref, self.cfg.workspace_path, "train.init_from")
        initial_run_meta(run, self.cfg.train.model, self.cfg.text.encoder)
        return run

    @functools.cached_property
    def sampled(self) -> Artifact:
        """The train run evaluate, generate and export-model sample: `evaluate.run` when set (an imported run,
        another config's run), else this config's own."""
        ref = self.cfg.evaluate.run
        return self.checkpoints if ref is None else train_run(ref, self.cfg.workspace_path, "evaluate.run")

    @functools.cached_property
    def evaluation(self) -> Artifact:
        cfg = self.cfg.evaluate.fingerprint_fields()
        return self._artifact("evaluate", versions.EVALUATE, cfg, {"train": self.sampled.fingerprint})

    def generation(self, settings: dict) -> Path:
        """The folder `t2i generate` writes a request's images to when no --out is given: a digest of the
        sampling settings and the training run."""
        digest = fingerprint("generate", versions.GENERATE, settings, {"train": self.sampled.fingerprint})
        return self.cfg.workspace_path / "generate" / digest

    def captioned_images(self, captions: Artifact) -> Artifact:
        """The images artifact a recaption artifact captioned (downloaded images or CutMix composites), by
        the fingerprint its manifest names, in the captions' own workspace (a held-out split may come from
        another configuration)."""
        fingerprint_ = captions.read_manifest()["inputs"]["images"]
        for stage in ("download", "cutmix"):
            images = Artifact(captions.workspace, stage, fingerprint_)
            if images.is_complete():
                return images
        raise MissingInput(
            f"the images captioned in {captions.root} ({fingerprint_}) are in neither the download nor the "
            f"cutmix folder of {captions.workspace}"
        )

    def ablation_dir(self, evaluations: dict[str, str]) -> Path:
        """The folder of an ablation's report over these evaluations (`variant/seed` → fingerprint)."""
        return (
            self.cfg.workspace_path / "ablation" / fingerprint("ablation", versions.ABLATION, {}, evaluations)
        )

    def artifacts(self) -> list[tuple[str, str, Artifact]]:
        """(label, stage command, artifact) for every output this config implies, in pipeline order."""
        out = [("download", "download", self.images)]
        if self.composites is not None:
            out.append(("cutmix", "cutmix", self.composites))
        for name, images in self.image_sets():
            suffix = " (composites)" if name == "cutmix" else ""
            out.append((f"recaption{suffix}", "recaption", self.captions_of(images)))
        for name, images in self.image_sets():
            suffix = " (composites)" if name == "cutmix" else ""
            out.append((f"latents{suffix}", "latents", self.latents_of(images)))
            if (text := self.text_of(self.captions_of(images))) is not None:
                out.append((f"text embeddings{suffix}", "latents", text))
        out += [("train", "train", self.checkpoints), ("evaluate", "evaluate", self.evaluation)]
        return out

    def artifact(self, stage: str) -> Artifact:
        return {
            "download": lambda: self.images,
            "cutmix": lambda: self.composites,
            "recaption": lambda: self.captions,
            "latents": lambda: self.latents,
            "train": lambda: self.checkpoints,
            "evaluate": lambda: self.evaluation,
        }[stage]()

    def require_inputs(self, stage: str) -> None:
        """Every input of `stage` must be complete, before any work starts; otherwise `MissingInput` names the
        command that makes it. Precomputed text makes the captions of every image set an input of latents."""
        if stage == "evaluate":  # the run it samples, which may not be this config's own
            self.require("train", self.sampled)
            return
        for upstream in UPSTREAM[stage]:
            if upstream != "cutmix" or self.composites is not None:
                self.require(upstream)
        if stage == "latents" and self.cfg.text.mode == "precomputed":  # the captions it embeds
            for _, images in self.image_sets():
                self.require("recaption", self.captions_of(images))

    def require(self, stage: str, art: Artifact | None = None) -> Artifact:
        """The artifact of `stage` (or the given one), which must be complete; otherwise say which command
        makes it."""
        art = art or self.artifact(stage)
        if not art.is_complete():
            preset = self.cfg.preset
            raise MissingInput(
                f"the {stage} output for this config is missing or incomplete ({art.root}); "
                f"run `t2i {stage} --preset {preset}` with the same --set options first"
            )
        return art

"""Trained tiny models for the shapes world, made by this module from the world's own ground truth.

* a captioner in LLaVA Hugging Face format (CLIP vision tower + Llama, word-level tokenizer), trained on the
  ground-truth captions, so vLLM serves it like any llava-hf checkpoint and the recaption stage's output
  can be graded against the truth;
* an `AutoencoderKL` (SD layout, 4 latent channels, 4x downsampling) trained on the world's images, so
  latents decode to pictures the shapes scorer can read.

The `tiny` preset uses the copies committed under `models/weights/` (`tiny:shapes-captioner`,
`tiny:shapes-vae`); `t2i train-shapes-models` retrains them with the recipe recorded in each folder's
`training.json`. Training draws every batch from fixed scene indices and seeds all initialisation, so a
retrain on the same torch build and thread count repeats the committed run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from t2i.data import shapes
from t2i.models.tiny import LLAVA_CHAT_TEMPLATE, WEIGHTS_DIR, llava_tokenizer, sd_layout_vae

CAPTIONER_PROMPT = "describe the image"
_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
_PROMPT_WORDS = ["USER", "ASSISTANT", "SYSTEM", ":", "describe", "the", "image"]
_MAX_CAPTION_TOKENS = 27  # 3 phrases of 8 words, 2 separators and </s>
_CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
_CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

Log = Callable[[str], None]


@dataclass(frozen=True)
class CaptionerRecipe:
    """What made the committed captioner (AdamW, cosine to 5%, loss on caption tokens only)."""

    steps: int = 4600
    batch_size: int = 48
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.01
    vision_width: int = 128
    vision_layers: int = 3
    text_width: int = 128
    text_layers: int = 3
    patch: int = 8
    bf16: bool = True  # autocast; with eager attention it halves the CPU step time
    seed: int = 0
    data_seed: int = 1  # the world's seed for training scenes: the pipeline's own data (seed 0) stays unseen
    threads: int = 2


@dataclass(frozen=True)
class VAERecipe:
    """What made the committed VAE (AdamW, cosine, L1 + MSE on pixels, a small KL term; crops, then whole images)."""

    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    # KL per image (summed over latent elements) against a per-pixel *mean* reconstruction loss: 1e-9 here is
    # LDM's 1e-6 against a per-pixel *sum*, scaled to 64 px. At 1e-6 the posterior noise drowned low-contrast
    # objects (green on dark grey vanished from reconstructions).
    kl_weight: float = 1e-9
    channels: tuple[int, ...] = (16, 32, 64)
    crop: int = 32  # phase 1 on random crops (the VAE is convolutional): 4x cheaper than 64 px
    full_steps: int = 800  # phase 2 on whole 64 px images
    full_batch_size: int = 16
    full_lr: float = 2e-4
    seed: int = 0
    data_seed: int = 2
    threads: int = 2


def _lr_factor(step: int, steps: int, warmup: int, floor: float) -> float:
    """The recipes' schedule: a linear warmup multiplied into a cosine over all `steps` that ends at `floor`.

    Not the denoiser's `t2i.models.lr_schedule.lr_factor` (warmup, then a cosine over the steps after it):
    the committed models were trained with this one, and `t2i train-shapes-models` must repeat them."""
    w = min(1.0, (step + 1) / warmup)
    return w * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * step / steps)))


def _images(indices: range | list[int], seed: int, split: str) -> tuple[list, list[shapes.Scene]]:
    scenes = [shapes.scene(i, seed, split) for i in indices]
    return [shapes.render(s) for s in scenes], scenes


# ----------------------------------------------------------------------------------------- captioner


def build_word_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab: dict[str, int] = {}
    for w in [*_SPECIALS, *_PROMPT_WORDS, *shapes.CAPTION_WORDS]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # "USER:" -> USER, ":" and "left," -> left, ","
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins with spaces, " ," -> ","
    return llava_tokenizer(tok, 256)


def _build_captioner(recipe: CaptionerRecipe):
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    size, head_dim = shapes.IMAGE_SIZE, 32
    tokenizer = build_word_tokenizer()
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=tokenizer,
        patch_size=recipe.patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=recipe.vision_width,
        intermediate_size=2 * recipe.vision_width,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.vision_width // head_dim,
        image_size=size,
        patch_size=recipe.patch,
        projection_dim=recipe.vision_width,
    )
    text = LlamaConfig(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=recipe.text_width,
        intermediate_size=3 * recipe.text_width,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.text_width // head_dim,
        num_key_value_heads=recipe.text_width // head_dim,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        image_seq_length=(size // recipe.patch) ** 2,
    )
    torch.manual_seed(recipe.seed)
    model = LlavaForConditionalGeneration._from_config(config, attn_implementation="eager")
    return model, processor, tokenizer


def clip_pixels(images) -> torch.Tensor:
    """The CLIP processor's normalisation for 64x64 images, without its per-image Python overhead."""
    a = np.stack([np.asarray(im, np.float32) for im in images]) * np.float32(1 / 255)
    a = (a - _CLIP_MEAN) / _CLIP_STD
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def _caption_batch(tokenizer, prompt_ids: list[int], captions: list[str]):
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    n_prompt = len(prompt_ids)
    ids = torch.full((len(captions), n_prompt + _MAX_CAPTION_TOKENS), pad, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for b, caption in enumerate(captions):
        target = tokenizer(" " + caption, add_special_tokens=False)["input_ids"] + [eos]
        ids[b, :n_prompt] = torch.tensor(prompt_ids)
        ids[b, n_prompt : n_prompt + len(target)] = torch.tensor(target)
        labels[b, n_prompt : n_prompt + len(target)] = torch.tensor(target)
    return ids, labels


def train_captioner(out: Path, recipe: CaptionerRecipe = CaptionerRecipe(), log: Log = print) -> dict:
    """Train on the world's "train" split, save in HF format with vLLM's key names, return the record."""
    from t2i.models.tiny import rename_vision_tower_keys

    torch.set_num_threads(recipe.threads)
    model, processor, tokenizer = _build_captioner(recipe)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTIONER_PROMPT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    first = shapes.render(shapes.scene(0))
    prompt_ids = processor(images=[first], text=[prompt], return_tensors="pt")["input_ids"][0].tolist()
    params = sum(p.numel() for p in model.parameters())
    log(f"captioner: {params:,} parameters, {len(tokenizer)} tokens, {recipe.steps} steps")
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": other, "weight_decay": 0.0}],
        lr=recipe.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    history, smooth, start = [], None, time.perf_counter()
    for step in range(recipe.steps):
        for group in opt.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, recipe.steps, recipe.warmup_steps, 0.05)
        lo = step * recipe.batch_size
        images, scenes = _images(range(lo, lo + recipe.batch_size), recipe.data_seed, "train")
        ids, labels = _caption_batch(tokenizer, prompt_ids, [s.caption for s in scenes])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss = model(input_ids=ids, pixel_values=clip_pixels(images), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        smooth = loss.item() if smooth is None else 0.95 * smooth + 0.05 * loss.item()
        if (step + 1) % 100 == 0 or step + 1 == recipe.steps:
            elapsed = time.perf_counter() - start
            history.append({"step": step + 1, "loss": round(smooth, 5), "seconds": round(elapsed, 1)})
            log(f"captioner step {step + 1}/{recipe.steps} loss {smooth:.4f} ({elapsed:.0f} s)")
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rename_vision_tower_keys(out / "model.safetensors")
    return {
        "model": "captioner",
        "recipe": asdict(recipe),
        "parameters": params,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "history": history,
    }


@torch.inference_mode()
def captioner_accuracy(path: str | Path, n: int = 500, batch_size: int = 100) -> dict[str, float]:
    """Greedy captions (transformers) of `n` unseen "test" scenes, graded against the ground truth."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = LlavaForConditionalGeneration.from_pretrained(path).eval()
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": CAPTIONER_PROMPT}]}],
        add_generation_prompt=True,
        tokenize=False,
    )
    totals: dict[str, float] = {}
    for lo in range(0, n, batch_size):
        images, scenes = _images(range(lo, min(n, lo + batch_size)), 0, "test")
        inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        generated = model.generate(**inputs, max_new_tokens=_MAX_CAPTION_TOKENS, do_sample=False)
        texts = processor.batch_decode(generated[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        for text, scene in zip(texts, scenes, strict=True):
            for key, value in shapes.caption_scores(text, scene).items():
                totals[key] = totals.get(key, 0.0) + value
    return {k: round(v / n, 4) for k, v in totals.items()}


# ----------------------------------------------------------------------------------------------- VAE


def _build_vae(recipe: VAERecipe):
    torch.manual_seed(recipe.seed)
    # without the mid-block attention it is convolutional, so it can train on crops (as SD's VAE did)
    return sd_layout_vae(recipe.channels, mid_block_add_attention=False, sample_size=shapes.IMAGE_SIZE)


def _to_unit_range(images) -> torch.Tensor:
    a = np.stack([np.asarray(im, np.float32) for im in images]) / 127.5 - 1.0
    return torch.from_numpy(a.transpose(0, 3, 1, 2).copy())


def _random_crops(x: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """One `size` crop per image, aligned to the 4-pixel latent grid."""
    if size >= x.shape[-1]:
        return x
    cells = (x.shape[-1] - size) // 4 + 1
    offsets = torch.randint(0, cells, (len(x), 2), generator=gen) * 4
    return torch.stack(
        [im[:, r : r + size, c : c + size] for im, (r, c) in zip(x, offsets.tolist(), strict=True)]
    )


def train_vae(out: Path, recipe: VAERecipe = VAERecipe(), log: Log = print) -> dict:
    """Phase 1 on crops (cheap), phase 2 on whole images with a fresh optimizer (removes the crop/whole
    image mismatch of GroupNorm statistics); save in diffusers format and return the record."""
    torch.set_num_threads(recipe.threads)
    vae = _build_vae(recipe)
    params = sum(p.numel() for p in vae.parameters())
    log(f"vae: {params:,} parameters, {recipe.steps} + {recipe.full_steps} steps")
    history: list[dict] = []
    start = time.perf_counter()
    _vae_phase(vae, recipe, "crops", recipe.steps, recipe.batch_size, recipe.lr, recipe.crop, 0, log, history)
    whole = (recipe.full_steps, recipe.full_batch_size, recipe.full_lr, shapes.IMAGE_SIZE)
    _vae_phase(vae, recipe, "whole", *whole, recipe.steps * recipe.batch_size, log, history)
    vae.eval()
    out.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(out)
    return {
        "model": "vae",
        "recipe": asdict(recipe),
        "parameters": params,
        "train_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "history": history,
    }


def _vae_phase(vae, recipe: VAERecipe, name, steps, batch, lr, crop, first, log, history) -> None:
    """AdamW with warmup and cosine; L1 + MSE on pixels plus a small KL; batches from scene `first` on."""
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + (name == "whole"))
    vae.train()
    smooth, start = None, time.perf_counter()
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, recipe.warmup_steps, 0.02)
        lo = first + step * batch
        x = _to_unit_range(_images(range(lo, lo + batch), recipe.data_seed, "train")[0])
        x = _random_crops(x, crop, gen)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() + ((recon - x) ** 2).mean()
        loss = rec + recipe.kl_weight * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        smooth = rec.item() if smooth is None else 0.95 * smooth + 0.05 * rec.item()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            elapsed = time.perf_counter() - start
            history.append(
                {"phase": name, "step": step + 1, "loss": round(smooth, 5), "seconds": round(elapsed, 1)}
            )
            log(f"vae {name} step {step + 1}/{steps} reconstruction loss {smooth:.4f} ({elapsed:.0f} s)")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Mean per-image PSNR (dB) of uint8 image batches (N, H, W, 3)."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


@torch.inference_mode()
def vae_quality(path: str | Path, n: int = 500, batch_size: int = 100) -> dict[str, float]:
    """PSNR and the shapes scorer's overall score on reconstructions of `n` unseen "test" scenes."""
    from t2i.models.vae import decode_latents, load_vae

    vae = load_vae(str(path))
    psnrs, scores = [], []
    for lo in range(0, n, batch_size):
        images, scenes = _images(range(lo, min(n, lo + batch_size)), 0, "test")
        decoded = decode_latents(vae, vae.encode(_to_unit_range(images)).latent_dist.mean)
        truth = np.stack([np.asarray(im) for im in images])
        psnrs.append(psnr(decoded, truth) * len(images))
        scores += [shapes.score_generation(d, s)["overall"] for d, s in zip(decoded, scenes, strict=True)]
    return {"psnr": round(sum(psnrs) / n, 2), "shapes_score": round(float(np.mean(scores)), 4)}


# --------------------------------------------------------------------------------------------- entry


def retrain(which: str, out_root: Path, steps: int | None = None, log: Log = print) -> dict:
    """Train `captioner` or `vae` into `out_root/shapes-<which>` (atomically) and grade it."""
    from t2i.data.store import atomic_path

    out = Path(out_root) / f"shapes-{which}"
    previous = out.with_name(f".previous-{out.name}")
    try:
        with atomic_path(out) as tmp:
            if which == "captioner":
                recipe = CaptionerRecipe(**({"steps": steps} if steps else {}))
                record = train_captioner(tmp, recipe, log)
                record["quality"] = captioner_accuracy(tmp)
            elif which == "vae":
                default = VAERecipe()
                recipe = default
                if steps:  # both phases, keeping their ratio
                    recipe = VAERecipe(
                        steps=steps, full_steps=max(1, round(steps * default.full_steps / default.steps))
                    )
                record = train_vae(tmp, recipe, log)
                record["quality"] = vae_quality(tmp)
            else:
                raise ValueError(f"which must be 'captioner' or 'vae', got {which!r}")
            default_out = Path(out_root).resolve() == WEIGHTS_DIR.resolve()  # no local path in the record
            record["command"] = (
                f"t2i train-shapes-models {which}"
                + ("" if default_out else f" --out {out_root}")
                + (f" --steps {steps}" if steps else "")
            )
            (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
            if out.exists():  # set the old model aside; it is deleted once the new one is in place
                shutil.rmtree(previous, ignore_errors=True)
                out.rename(previous)
    except BaseException:
        if previous.exists() and not out.exists():  # the swap failed half-way: put the old model back
            previous.rename(out)
        raise
    shutil.rmtree(previous, ignore_errors=True)
    log(f"{which}: {record['quality']} -> {out}")
    return record

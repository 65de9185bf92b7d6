"""Tiny models for the embedded default, which needs no Hub: their builders, names and identities.

`tiny:llava`, `tiny:vae` and `tiny:t5` are randomly initialised models built once (seeded, so every machine
gets the same weights) in Hugging Face format by `t2i.models.loading.resolve_model`; `tiny:shapes-captioner`
and `tiny:shapes-vae` are the committed models trained on the shapes world (`t2i.models.shapes_models`). The
LLaVA tokenizer and the SD-layout VAE specs here are shared with those trained models.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from pathlib import Path

from t2i.data.versions import TINY_MODELS

TINY_PREFIX = "tiny:"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # the committed trained models
TINY_T5_D_MODEL = 64  # the tiny T5's width, known without building it (`t2i config` estimates disk with it)

# Words the tiny tokenizers must know: the shapes world's captions and the prompts sent with images.
_CORPUS = [
    "a large red circle in the top left, a small blue square in the center and a large green triangle at the bottom",
    "a small yellow square on the left and a large purple circle on the right",
    "a large orange triangle in the top right, a small red square in the bottom left",
    "a small green circle at the top and a large blue triangle in the bottom right",
    "describe the image. Describe this image. An image of a red circle.",
    "USER: ASSISTANT: the image shows shapes on a plain background. 0 1 2 3 4 5 6 7 8 9 , . ! ? : ; - ' \"",
] * 4

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% else %}SYSTEM: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url', 'image_pil') %}<image>{{ '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}</s>{% endif %}{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def is_tiny(ref: str) -> bool:
    return ref.startswith(TINY_PREFIX)


def tiny_identity(ref: str) -> str:
    """What a `tiny:*` name stands for right now, for fingerprints, so that a rebuilt or retrained model never
    reuses old outputs: the builder version of a built model; a digest of a trained one's files (weights,
    config, tokenizer; not its training record)."""
    name = ref[len(TINY_PREFIX) :]
    if name not in TRAINED:
        return f"built-v{TINY_MODELS}"
    folder = WEIGHTS_DIR / TRAINED[name]
    if not folder.is_dir():
        return "weights-missing"  # loading.resolve_model names the command that makes them
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "training.json")
    return f"weights-{_digest(tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))}"


@functools.lru_cache(maxsize=16)
def _digest(files: tuple[tuple[str, int, int], ...]) -> str:
    """sha256 of the files' bytes (cached on path, size and mtime: plans ask for it once per stage)."""
    digest = hashlib.sha256()
    for path, _, _ in files:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()[:16]


def tiny_identities(config: object) -> dict[str, str]:
    """`tiny_identity` of every `tiny:*` string anywhere in a (nested) config."""
    if isinstance(config, str):
        return {config: tiny_identity(config)} if is_tiny(config) else {}
    values = (
        config.values() if isinstance(config, dict) else config if isinstance(config, list | tuple) else ()
    )
    return {k: v for item in values for k, v in tiny_identities(item).items()}


def _bpe_tokenizer(specials: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return tok


def llava_tokenizer(tokenizer_object, model_max_length: int):
    """A LLaVA tokenizer (`<s>`, `</s>`, `<unk>`, `<pad>`, `<image>`, the chat template) around a trained
    `tokenizers.Tokenizer`."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=model_max_length,
    )
    tokenizer.chat_template = LLAVA_CHAT_TEMPLATE
    return tokenizer


def sd_layout_vae(channels: tuple[int, ...], **options):
    """An `AutoencoderKL` with Stable Diffusion's layout (4 latent channels, one block per width) and the
    given widths; `options` go to the constructor (e.g. `sample_size`)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        block_out_channels=channels,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        **options,
    )


def build_tiny_llava(
    out: Path,
    image_size: int = 32,
    patch: int = 8,
    seed: int = 0,
    vision_width: int = 64,
    vision_layers: int = 2,
    text_width: int = 64,
    text_layers: int = 2,
    head_dim: int = 32,
) -> None:
    """A LLaVA-1.5-layout model (CLIP vision + Llama) that vLLM serves like any llava-hf checkpoint.

    vLLM's CPU attention needs a head size of 32/64/80/...: the default, hidden 64 with 2 heads, gives 32.
    Larger widths and depths give the random models that benchmarks need.
    """
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    try:  # transformers 5 splits image processors into torchvision / PIL backends
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # pragma: no cover
        from transformers import CLIPImageProcessor as ImageProcessor

    torch.manual_seed(seed)
    tokenizer = llava_tokenizer(_bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], 400), 512)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vocab_padded = (len(tokenizer) + 63) // 64 * 64
    vision = CLIPVisionConfig(
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_width // head_dim,
        image_size=image_size,
        patch_size=patch,
        projection_dim=vision_width,
    )
    text = LlamaConfig(
        vocab_size=vocab_padded,
        hidden_size=text_width,
        intermediate_size=2 * text_width if text_width <= 64 else 3 * text_width,
        num_hidden_layers=text_layers,
        num_attention_heads=text_width // head_dim,
        num_key_value_heads=text_width // head_dim,
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    num_image_tokens = (image_size // patch) ** 2
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=num_image_tokens,
    )
    model = LlavaForConditionalGeneration(config).eval()
    image_processor = ImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    rename_vision_tower_keys(out / "model.safetensors")


def rename_vision_tower_keys(path: Path) -> None:
    """transformers 5 saves the CLIP tower as `vision_tower.embeddings.*`; vLLM (and every llava-hf
    checkpoint) uses `vision_tower.vision_model.*`. transformers loads both, so rename to the common one."""
    from safetensors.torch import load_file, save_file

    state = load_file(path)
    fixed = {}
    for k, v in state.items():
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower.") :]
        fixed[k] = v.contiguous()
    save_file(fixed, path, metadata={"format": "pt"})


def build_tiny_vae(out: Path, seed: int = 0) -> None:
    """An AutoencoderKL with the SD layout (4 latent channels) and 4× downsampling, small enough for a CPU."""
    import torch

    torch.manual_seed(seed)
    sd_layout_vae((16, 32, 32), sample_size=64).save_pretrained(out)


def build_tiny_t5(out: Path, seed: int = 0, context: float = 0.6) -> None:
    """A T5 encoder with a locally trained tokenizer that, like T5's, appends `</s>` and pads with id 0, and
    whose random weights still make each output token depend on its neighbours, as a trained encoder's do.

    With plain random weights an encoder is a bag of words: at the default init every token comes out nearly
    the same ("red" and "blue" in one sentence at cosine ~0.9), and at a small init each output is just its
    own embedding, so "a red circle and a blue square" reads like "a blue circle and a red square" and no
    denoiser can learn which colour goes with which shape or place. So: a small init (tokens stay distinct),
    then each head of the first layer's relative-position bias looks at one fixed offset (-4..4, T5 shares
    the bias with the second layer, so the context reaches 8 tokens either way), and the value and output
    projections are scaled so the context adds `context` times the size of the token embedding.
    """
    import torch
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    from transformers.models.t5.modeling_t5 import T5Attention

    torch.manual_seed(seed)
    tok = _bpe_tokenizer(["<pad>", "</s>", "<unk>"], 400)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", model_max_length=512
    )
    offsets = (-1, 1, -2, 2, -3, 3, -4, 4)  # one per head
    config = T5Config(
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        d_model=TINY_T5_D_MODEL,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_heads=len(offsets),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        initializer_factor=0.1,
    )
    model = T5EncoderModel(config).eval()
    with torch.no_grad():
        for module in model.modules():  # the factor also shrinks RMSNorm gains; keep them at 1
            if type(module).__name__ == "T5LayerNorm":
                module.weight.fill_(1.0)
        bias = model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
        bias.zero_()  # (buckets, heads); the queries and keys are tiny, so this bias sets the attention
        for head, offset in enumerate(offsets):
            bucket = T5Attention._relative_position_bucket(
                torch.tensor(offset),
                bidirectional=True,
                num_buckets=config.relative_attention_num_buckets,
                max_distance=config.relative_attention_max_distance,
            )
            bias[int(bucket), head] = 8.0  # ~99.5% of the head's attention on that one neighbour
        embedding_std = float(model.shared.weight.std())
        inner = config.num_heads * config.d_kv
        for block in model.encoder.block:
            attention = block.layer[0].SelfAttention
            attention.v.weight.normal_(0.0, config.d_model**-0.5)  # unit-scale values from normed inputs
            attention.o.weight.normal_(0.0, context * embedding_std / inner**0.5)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# Trained on the shapes world by `t2i.models.shapes_models` and committed under models/weights/.
TRAINED: dict[str, str] = {"shapes-captioner": "shapes-captioner", "shapes-vae": "shapes-vae"}

BUILDERS: dict[str, Callable[[Path], None]] = {
    "llava": build_tiny_llava,
    "vae": build_tiny_vae,
    "t5": build_tiny_t5,
}

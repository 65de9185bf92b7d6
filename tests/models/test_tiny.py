"""The tiny random T5 behaves like a text encoder a denoiser can learn from: tokens stay distinct, and each
output token depends on its neighbours (so "a red circle" and "a blue circle" differ at "circle" too)."""

import pytest
import torch
from transformers import AutoTokenizer, T5EncoderModel

from t2i.models.tiny import build_tiny_t5


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    out = tmp_path_factory.mktemp("t5")
    build_tiny_t5(out)
    return AutoTokenizer.from_pretrained(out), T5EncoderModel.from_pretrained(out).eval()


def _encode(t5, text: str) -> tuple[list[str], torch.Tensor]:
    tokenizer, model = t5
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[0]
    return tokenizer.convert_ids_to_tokens(batch.input_ids[0]), hidden


def _index(tokens: list[str], word: str) -> int:
    return [t.lstrip("Ġ") for t in tokens].index(word)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.cosine_similarity(a, b, dim=-1))


def test_outputs_carry_neighbouring_words_and_keep_words_apart(t5):
    red_first = "a small red circle in the top left and a large blue square at the bottom"
    blue_first = "a small blue circle in the top left and a large red square at the bottom"
    tokens, a = _encode(t5, red_first)
    tokens_b, b = _encode(t5, blue_first)
    assert len(tokens) == len(tokens_b)
    colour, shape = _index(tokens, "red"), _index(tokens, "circle")
    # the swapped colour words themselves stay far apart, as a trained encoder keeps them
    assert _cos(a[colour], b[colour]) < 0.6
    # "circle" knows which colour came before it: a bag-of-words encoder gives cosine 1.0 here
    assert _cos(a[shape], b[shape]) < 0.98
    # ... yet it is still mostly "circle": the same word in another sentence is closer than another word
    other_tokens, other = _encode(t5, "a large green circle at the top")
    same_word = other[_index(other_tokens, "circle")]
    assert _cos(a[shape], same_word) > max(_cos(a[shape], a[i]) for i in range(len(tokens)) if i != shape)


def test_build_is_deterministic(t5, tmp_path):
    build_tiny_t5(tmp_path)
    again = T5EncoderModel.from_pretrained(tmp_path)
    for (name, p), q in zip(t5[1].state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(p, q), name

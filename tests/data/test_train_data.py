"""The memory-mapped train table: latents, captions and stored text joined by key once, then read by row."""

import json
import mmap
import pickle
import threading

import numpy as np
import pyarrow as pa
import pytest
import torch

from t2i.data.schemas import CAPTIONS, LATENTS, SHAPE_META_KEY, TEXT_EMBEDDINGS
from t2i.data.store import Artifact
from t2i.data.train_data import TrainTable, build_train_table

SHAPE = (4, 8, 8)
DIM = 6


def _inputs(ws, shards=3, rows=10, rejected=("k0-3", "k2-9"), dtype="bfloat16"):
    """Latents, captions (the captioner rejected `rejected`) and text embeddings, as the stages write them."""
    rng = np.random.default_rng(0)
    latents, captions, text = (Artifact(ws, s, "fp-" + s) for s in ("latents", "recaption", "text"))
    expected = {}
    for i in range(shards):
        keys = [f"k{i}-{j}" for j in range(rows)]
        mean = rng.standard_normal((rows, *SHAPE)).astype(np.float16)
        std = rng.random((rows, *SHAPE)).astype(np.float16)
        latents.write_shard(i, pa.Table.from_pydict(
            {"key": keys, "mean": [m.tobytes() for m in mean], "std": [s.tobytes() for s in std]}, schema=LATENTS,
        ).replace_schema_metadata({SHAPE_META_KEY: json.dumps(list(SHAPE)).encode()}))  # fmt: skip
        kept = [k for k in keys if k not in rejected]
        captions.write_shard(i, pa.Table.from_pylist(
            [{"key": k, "caption": f"caption of {k}", "model": "m", "tokens": 3, "finish_reason": "stop"}
             for k in reversed(kept)], schema=CAPTIONS))  # fmt: skip
        lengths = rng.integers(1, 5, len(kept))
        emb = [torch.randn(int(n), DIM).to(getattr(torch, dtype)) for n in lengths]
        text.write_shard(i, pa.Table.from_pydict(
            {"key": kept, "embedding": [e.view(torch.uint8).numpy().tobytes() for e in emb],
             "tokens": lengths.astype(np.int32)}, schema=TEXT_EMBEDDINGS))  # fmt: skip
        for j, k in enumerate(keys):
            if k in kept:
                expected[k] = (mean[j], std[j], emb[kept.index(k)])
    null = torch.randn(2, DIM).to(getattr(torch, dtype))
    text.write_manifest(config={}, inputs={}, started=0.0,
                        extra={"dim": DIM, "dtype": dtype, "null_embedding": null.float().tolist()})  # fmt: skip
    return latents, captions, text, expected


def test_rows_join_latents_captions_and_text_by_key(tmp_path):
    latents, captions, text, expected = _inputs(tmp_path)
    table = TrainTable(
        build_train_table(Artifact(tmp_path, "train-data", "t"), latents, captions, 3, text).root
    )
    assert len(table) == 28 and table.latent_shape == SHAPE  # 30 latents, 2 without a caption
    keys = table.column("key", np.arange(len(table)))
    assert sorted(keys) == sorted(expected) and "k0-3" not in keys
    picks = np.array([27, 0, 13, 13])
    mean, std = table.moments_of(picks)
    for i, row in enumerate(picks):
        want_mean, want_std, want_text = expected[keys[row]]
        assert torch.equal(mean[i], torch.from_numpy(want_mean).float())
        assert torch.equal(std[i], torch.from_numpy(want_std).float())
        assert table.column("caption", [row]) == [f"caption of {keys[row]}"]
        assert torch.equal(table.embeddings_of([row])[0], want_text)
    assert isinstance(table.moments.base, mmap.mmap)  # read by row, never loaded whole


def test_a_table_pickles_as_its_path_and_is_built_once(tmp_path):
    latents, captions, _, _ = _inputs(tmp_path)
    out = Artifact(tmp_path, "train-data", "t")
    built = build_train_table(out, latents, captions, 3)
    stamp = (built.root / "moments.npy").stat().st_mtime_ns
    assert build_train_table(out, latents, captions, 3).root == built.root
    assert (built.root / "moments.npy").stat().st_mtime_ns == stamp
    table = TrainTable(built.root)
    assert len(pickle.dumps(table)) < 500  # loader processes reopen the maps
    again = pickle.loads(pickle.dumps(table))
    assert torch.equal(again.moments_of([5])[0], table.moments_of([5])[0])
    assert table.words is None
    with pytest.raises(RuntimeError, match="share no keys"):
        empty = Artifact(tmp_path, "recaption", "none")
        empty.write_shard(0, pa.Table.from_pylist([], schema=CAPTIONS))
        build_train_table(Artifact(tmp_path, "train-data", "no-captions"), latents, empty, 1)


def test_two_builders_of_one_table_both_get_it_complete(tmp_path):
    """Two nodes launching the same job build the same table into one shared workspace."""
    latents, captions, text, _ = _inputs(tmp_path)
    out, results = Artifact(tmp_path, "train-data", "t"), []

    def build():
        results.append(build_train_table(out, latents, captions, 3, text))

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and out.is_complete() and len(TrainTable(out.root)) == 28
    assert not [p for p in out.root.parent.iterdir() if p.name.startswith(".tmp-")]

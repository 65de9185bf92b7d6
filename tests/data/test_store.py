import json
import os
import time

import pyarrow as pa
import pytest

from t2i.data.store import FOREIGN_STALE_SECONDS, Artifact, Reject, atomic_path, fingerprint, host_tag


def table(n: int) -> pa.Table:
    return pa.table({"key": [f"k{i}" for i in range(n)], "x": list(range(n))})


def test_fingerprint_depends_on_config_inputs_and_version_only():
    base = fingerprint("latents", 1, {"resolution": 256, "vae": "v"}, {"images": "abc"})
    assert base == fingerprint("latents", 1, {"vae": "v", "resolution": 256}, {"images": "abc"})  # key order
    assert base != fingerprint("latents", 2, {"resolution": 256, "vae": "v"}, {"images": "abc"})
    assert base != fingerprint("latents", 1, {"resolution": 128, "vae": "v"}, {"images": "abc"})
    assert base != fingerprint("latents", 1, {"resolution": 256, "vae": "v"}, {"images": "abd"})


def test_shard_roundtrip_with_rejects(tmp_path):
    art = Artifact(tmp_path, "download", "fp")
    info = art.write_shard(0, table(3), [Reject("bad.jpg", "truncated", "cut at 10 bytes")])
    assert (info.rows, info.rejects) == (3, 1)
    assert art.has_shard(0) and not art.has_shard(1)
    assert art.read_shard(0)["key"].to_pylist() == ["k0", "k1", "k2"]
    assert art.shard_rejects(0) == [Reject("bad.jpg", "truncated", "cut at 10 bytes")]
    assert [p.name for p in art.root.iterdir()] == ["part-00000.parquet"]  # no temporary left behind


def test_failed_write_leaves_no_partial_file(tmp_path):
    art = Artifact(tmp_path, "download", "fp")
    with pytest.raises(RuntimeError), atomic_path(art.shard_path(0)) as tmp:
        tmp.write_bytes(b"half a shard")
        raise RuntimeError("killed mid-write")
    assert not art.has_shard(0)
    assert list(art.root.iterdir()) == []


def test_unreadable_shard_is_not_done(tmp_path):
    art = Artifact(tmp_path, "download", "fp")
    art.root.mkdir(parents=True)
    art.shard_path(0).write_bytes(b"PAR1 this is not a parquet file")
    assert not art.has_shard(0)


def test_finalize_writes_manifest_last_with_reject_counts(tmp_path):
    art = Artifact(tmp_path, "download", "fp")
    art.write_shard(0, table(2), [Reject("a", "truncated"), Reject("b", "not an image")])
    with pytest.raises(RuntimeError, match=r"shards \[1\] are missing"):
        art.finalize_shards(num_shards=2, config={}, inputs={}, started=0.0)
    assert not art.is_complete()
    art.write_shard(1, table(4), [Reject("c", "truncated")])
    manifest = art.finalize_shards(num_shards=2, config={"x": 1}, inputs={"images": "f"}, started=0.0)
    assert art.is_complete()
    assert manifest["rows"] == 6 and manifest["rejects"] == 3
    assert manifest["rejects_by_reason"] == {"not an image": 1, "truncated": 2}
    assert [s["rows"] for s in manifest["shards"]] == [2, 4]
    lines = [json.loads(x) for x in (art.root / "rejects.jsonl").read_text().splitlines()]
    assert {(r["shard"], r["key"], r["reason"]) for r in lines} == {
        (0, "a", "truncated"),
        (0, "b", "not an image"),
        (1, "c", "truncated"),
    }


def tmp_name(host: str, pid: int, name: str) -> str:
    return f".tmp-{host}-{pid}-abcd1234-{name}"


def test_stale_temporaries_of_dead_writers_are_removed(tmp_path):
    art = Artifact(tmp_path, "download", "fp")
    art.root.mkdir(parents=True)
    here = host_tag()
    dead = art.root / tmp_name(here, 999999999, "part-00000.parquet")  # no such pid
    live = art.root / tmp_name(here, os.getppid(), "part-00001.parquet")
    ours = art.root / tmp_name(here, os.getpid(), "part-00002.parquet")
    old_dead = art.root / ".tmp-999999999-abcd1234-part-00003.parquet"  # the format before host tags
    old_live = art.root / f".tmp-{os.getppid()}-abcd1234-part-00004.parquet"
    for path in (dead, live, ours, old_dead, old_live):
        path.write_bytes(b"x")
    assert art.clean_stale_temporaries() == 2
    assert sorted(p.name for p in art.root.iterdir()) == sorted(p.name for p in (live, ours, old_live))


def test_atomic_path_names_its_temporary_after_host_and_pid(tmp_path):
    with atomic_path(tmp_path / "out.bin") as tmp:
        assert tmp.name.startswith(f".tmp-{host_tag()}-{os.getpid()}-") and tmp.name.endswith("-out.bin")
        tmp.write_bytes(b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_another_hosts_temporaries_are_removed_only_when_long_untouched(tmp_path):
    """Another host's pid cannot be checked here (shared filesystem): only its files' age tells."""
    art = Artifact(tmp_path, "download", "fp")
    art.root.mkdir(parents=True)
    other = "0123abcd" if host_tag() != "0123abcd" else "4567cdef"
    fresh = art.root / tmp_name(other, 999999999, "part-00000.parquet")  # no such pid here
    old = art.root / tmp_name(other, 999999999, "part-00001.parquet")
    old_dir, busy_dir = art.root / tmp_name(other, 999999999, "ckpt"), art.root / tmp_name(other, 1, "ckpt2")
    for path in (fresh, old):
        path.write_bytes(b"x")
    for d in (old_dir, busy_dir):
        d.mkdir()
        (d / "a.bin").write_bytes(b"x")
        (d / "b.bin").write_bytes(b"x")
    long_ago = time.time() - FOREIGN_STALE_SECONDS - 60
    for path in (old, old_dir, old_dir / "a.bin", old_dir / "b.bin", busy_dir, busy_dir / "a.bin"):
        os.utime(path, (long_ago, long_ago))
    assert art.clean_stale_temporaries() == 2  # busy_dir's newest child (b.bin) is fresh
    assert sorted(p.name for p in art.root.iterdir()) == sorted([fresh.name, busy_dir.name])

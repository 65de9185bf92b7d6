"""WebDataset tar shards as a download source: the same images as the folder they were made from, bad members
rejected with a reason and nothing else lost, listed once and skipped when complete, in every spec form."""

import io
import tarfile

import pytest
import webdataset as wds

from t2i.data import shapes
from t2i.data.tar_shards import TarHeaders
from t2i.flows.config import load_config
from t2i.flows.download import download_flow
from t2i.flows.plan import Plan
from t2i.flows.status import stage_statuses

COUNT, PER_TAR = 240, 64  # 4 tars, the last one short


def shapes_folder(root, count: int = COUNT) -> list[tuple[str, bytes]]:
    """ImageNet's layout of shapes images, `<class>/<index>.png`: (path, bytes) in sorted path order."""
    files = []
    for i in range(count):
        scene = shapes.scene(i, seed=3)
        buf = io.BytesIO()
        shapes.render(scene).save(buf, "PNG")
        files.append((f"{scene.class_name.replace(' ', '_')}/{i:05d}.png", buf.getvalue()))
    for rel, data in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return sorted(files)


def write_tars(folder, files, sample) -> list:
    """The files as WebDataset shards `train-0000.tar`, ... in the folder's order, `sample(path, data)` making
    each sample."""
    folder.mkdir(parents=True)
    with wds.ShardWriter(str(folder / "train-%04d.tar"), maxcount=PER_TAR, verbose=0) as sink:
        for rel, data in files:
            sink.write(sample(rel, data))
    return sorted(folder.glob("*.tar"))


def with_class(rel: str, data: bytes) -> dict:
    """The class folder's name (a wnid in ImageNet) as text in `.cls`, and nested in `.json`."""
    wnid = rel.split("/")[0]
    return {"__key__": rel.rsplit(".", 1)[0], "png": data, "cls": wnid, "json": {"meta": {"wnid": wnid}}}


def download(workspace, source: str, *extra: str) -> tuple[list[dict], dict, Plan]:
    overrides = ["cutmix.enabled=false", "download.max_images=null", "download.shard_size=50", *extra]
    cfg = load_config("tiny", [*overrides, f"download.source={source}"], str(workspace))
    summary = download_flow(cfg)
    plan = Plan(cfg)
    rows = [r for i in range(plan.num_shards) for r in plan.images.read_shard(i).to_pylist()]
    return rows, summary, plan


def rejects(plan: Plan) -> dict[str, tuple[str, str]]:
    art = plan.images
    return {r.key: (r.reason, r.detail) for i in range(plan.num_shards) for r in art.shard_rejects(i)}


@pytest.fixture
def shapes_source(tmp_path):
    files = shapes_folder(tmp_path / "folder")
    return tmp_path / "folder", files


@pytest.mark.parametrize("wds_class", ["cls", "json:meta.wnid"])
def test_a_webdataset_copy_downloads_to_the_folder_tables(
    prefect_harness, workspace, tmp_path, shapes_source, wds_class
):
    folder, files = shapes_source
    member = wds_class.partition(":")[0]  # each copy holds its class in that member only

    def sample(rel, data):
        return {k: v for k, v in with_class(rel, data).items() if k not in ("cls", "json") or k == member}

    tars = write_tars(tmp_path / "shards", files, sample)
    assert len(tars) == 4
    from_folder, _, folder_plan = download(workspace, f"folder:{folder}")
    from_tars, summary, plan = download(
        workspace, f"wds:{tmp_path / 'shards'}", f"download.wds_class={wds_class}"
    )

    assert summary["rows"] == COUNT and not rejects(plan) and plan.num_shards == folder_plan.num_shards == 5
    # Row for row in the same shards: the tars hold the folder's files in its sorted order, so both listings
    # are the same sequence and the seeded shuffle deals them out alike. Keys are `__key__`: the folder's
    # path without its extension.
    assert [r["key"] for r in from_tars] == [r["key"].rsplit(".", 1)[0] for r in from_folder]
    for name in ("image", "label", "class_name", "width", "height", "caption_gt", "attributes"):
        assert [r[name] for r in from_tars] == [r[name] for r in from_folder], name
    assert {r["class_name"] for r in from_tars} == {rel.split("/")[0] for rel, _ in files}
    assert len(plan.source_summary.classes) == len(folder_plan.source_summary.classes) > 10


def test_integer_cls_keeps_the_datasets_numbering(prefect_harness, workspace, tmp_path, shapes_source):
    folder, files = shapes_source
    classes = sorted({rel.split("/")[0] for rel, _ in files})

    def with_index(rel, data):
        return {"__key__": rel.rsplit(".", 1)[0], "png": data, "cls": classes.index(rel.split("/")[0])}

    write_tars(tmp_path / "shards", files, with_index)
    rows, _, plan = download(workspace, f"wds:{tmp_path / 'shards'}/train-{{0000..0003}}.tar")
    by_key = {rel.rsplit(".", 1)[0]: classes.index(rel.split("/")[0]) for rel, _ in files}
    assert len(rows) == COUNT and all(r["label"] == by_key[r["key"]] for r in rows)
    assert all(r["class_name"] == str(r["label"]) for r in rows)  # an index names no class: its text
    assert plan.source_summary.classes == [str(i) for i in range(len(classes))]


def test_bad_members_are_rejected_with_a_reason_and_the_rest_kept(
    prefect_harness, workspace, tmp_path, shapes_source
):
    _, files = shapes_source
    broken = {files[10][0]: "half image", files[70][0]: "no image"}

    def sample(rel, data):
        s = with_class(rel, data)
        if broken.get(rel) == "half image":  # a cut PNG inside an intact tar
            s["png"] = data[: len(data) // 2]
        elif broken.get(rel) == "no image":
            del s["png"]
        return s

    tars = write_tars(tmp_path / "shards", files, sample)
    last = tars[-1].read_bytes()  # cut the last tar in the middle of its last image
    with TarHeaders(tars[-1]) as tar:
        image = [m for m in tar if m.name.endswith(".png")][-1]
    tars[-1].write_bytes(last[: image.offset + image.size // 2])
    cut_key = image.name.rsplit(".", 1)[0]

    rows, summary, plan = download(workspace, f"wds:{tmp_path / 'shards'}")
    got = rejects(plan)
    key = {rel: rel.rsplit(".", 1)[0] for rel, _ in files}
    assert {k: reason for k, (reason, _) in got.items()} == {
        key[files[10][0]]: "truncated",  # decoding found the PNG cut short
        key[files[70][0]]: "no image",
        cut_key: "truncated",  # the listing found the tar ending inside it
    }
    assert "png" not in got[key[files[70][0]]][1] and "cls, json" in got[key[files[70][0]]][1]
    assert image.name in got[cut_key][1]
    assert summary["rows"] == COUNT - 3 and plan.images.read_manifest()["rejects"] == 3
    assert {r["key"] for r in rows} == set(key.values()) - set(got)
    damaged = plan.source_summary.wds["damaged"]
    assert [d["tar"] for d in damaged] == [tars[-1].name] and image.name in damaged[0]["detail"]


def test_forms_of_one_set_of_tars_share_one_artifact_and_reruns_skip(prefect_harness, workspace, tmp_path):
    files = shapes_folder(tmp_path / "folder", count=96)
    tars = write_tars(tmp_path / "shards", files, with_class)
    brace = f"wds:{tmp_path / 'shards'}/train-{{0000..0001}}.tar"
    rows, summary, plan = download(workspace, brace)
    assert summary["rows"] == 96 and len(tars) == 2
    art = plan.images
    before = {p.name: p.stat().st_mtime_ns for p in art.root.iterdir()}

    for source in (brace, f"wds:{tmp_path / 'shards'}"):  # the same tars as a brace-glob and as a folder
        cfg = load_config(
            "tiny",
            [
                "cutmix.enabled=false",
                "download.max_images=null",
                "download.shard_size=50",
                f"download.source={source}",
            ],
            str(workspace),
        )
        assert Plan(cfg).images.fingerprint == art.fingerprint
        status = stage_statuses(cfg)[0]
        assert (status.stage, status.state) == ("download", "complete")
        assert download_flow(cfg)["skipped"] is True
    assert {p.name: p.stat().st_mtime_ns for p in art.root.iterdir()} == before

    one, _, one_plan = download(workspace, f"wds:{tars[0]}")  # a single tar: its own samples only
    assert len(one) == PER_TAR and one_plan.images.fingerprint != art.fingerprint


def test_missing_tars_and_bad_class_fields_fail_before_any_work(workspace, tmp_path):
    files = shapes_folder(tmp_path / "folder", count=8)
    write_tars(tmp_path / "shards", files, with_class)

    def plan(source: str, *extra: str) -> str:
        """What `t2i status` and every stage command do first: the download artifact's fingerprint."""
        return Plan(
            load_config("tiny", [f"download.source={source}", *extra], str(workspace))
        ).images.fingerprint

    with pytest.raises(FileNotFoundError, match=r"download.source: 2 of the 3 tars .* do not exist"):
        plan(f"wds:{tmp_path / 'shards'}/train-{{0000..0002}}.tar")
    with pytest.raises(FileNotFoundError, match="download.source: folder .* holds no .tar"):
        plan(f"wds:{tmp_path / 'folder'}")
    with pytest.raises(ValueError, match=r"download.wds_class=json:label: no sample .* has no field 'label'"):
        plan(f"wds:{tmp_path / 'shards'}", "download.wds_class=json:label")
    (tmp_path / "gz").mkdir()
    with tarfile.open(tmp_path / "gz" / "a.tar", "w:gz") as gz:
        gz.add(next((tmp_path / "folder").rglob("*.png")), "k.png")
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        plan(f"wds:{tmp_path / 'gz' / 'a.tar'}")
    assert not (workspace / "download").exists()


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_tar_headers_read_what_tarfile_reads(tmp_path, fmt):
    """Long and non-ASCII names (GNU long-name and pax records), folders and links skipped, empty members."""
    path = tmp_path / "t.tar"
    names = ["a.jpg", "d/" + "x" * 150 + ".cls", "é/ü.json", "empty.png"]
    if fmt == tarfile.USTAR_FORMAT:
        names[1], names[2] = "d/" + "x" * 90 + "/y.cls", "e/u.json"  # ustar: a 155-byte prefix, ASCII
    with tarfile.open(path, "w", format=fmt) as tar:
        folder = tarfile.TarInfo("folder")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 0 if name == "empty.png" else 700 * i + 5
            info.mtime = 1.5
            tar.addfile(info, io.BytesIO(bytes(info.size)))
        link = tarfile.TarInfo("link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isreg()]
    with TarHeaders(path) as tar:
        assert [(m.name, m.offset, m.size) for m in tar] == expected and tar.end is None
    assert [n for n, _, _ in expected] == names


def test_a_zero_block_inside_a_tar_is_damage_not_its_end(tmp_path):
    """Only two zero blocks end a tar: a lone one before more members (a bad copy, a preallocated file) names
    the tar as damaged instead of silently ending its listing; a tar of zeros lists nothing, damaged."""
    path = tmp_path / "t.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in ("a.jpg", "b.jpg"):
            info = tarfile.TarInfo(name)
            info.size = 600
            tar.addfile(info, io.BytesIO(bytes(600)))
    raw = path.read_bytes()
    with TarHeaders(path) as tar:
        assert [m.name for m in tar] == ["a.jpg", "b.jpg"] and tar.end is None
    second = 512 + 1024  # a.jpg's header and its 600 bytes padded to two blocks
    path.write_bytes(raw[:second] + bytes(512) + raw[second:])
    with TarHeaders(path) as tar:
        assert [m.name for m in tar] == ["a.jpg"] and "zero block at byte 1536" in tar.end
    path.write_bytes(bytes(10240))
    with TarHeaders(path) as tar:
        assert list(tar) == [] and "zero block at byte 0" in tar.end


def test_json_class_members_are_read_from_json(tmp_path):
    """`json:<field>` takes nested fields and integer values; the listing is cached per class field."""
    from t2i.data.listing import source_summary

    files = shapes_folder(tmp_path / "folder", count=6)
    write_tars(
        tmp_path / "shards",
        files,
        lambda rel, data: {**with_class(rel, data), "json": {"a": {"b": 7}}},
    )
    ws = tmp_path / "ws"
    by_json = source_summary(ws, f"wds:{tmp_path / 'shards'}", "train", None, wds_class="json:a.b")
    by_cls = source_summary(ws, f"wds:{tmp_path / 'shards'}", "train", None, wds_class="cls")
    assert by_json.classes == ["7"] and by_json.digest != by_cls.digest and len(by_cls.classes) > 1
    assert (ws / by_json.listing).is_file() and (ws / by_cls.listing).is_file()
    again = source_summary(ws, f"wds:{tmp_path / 'shards'}", "train", None, wds_class="json:a.b")
    assert again == by_json  # read from the cache, not listed again

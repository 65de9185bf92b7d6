"""The tiny pipeline through the `t2i` command, as a user runs it: end to end, rerun, crash, bad input."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from t2i.data.claims import ShardClaims, shard_claim
from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from t2i.flows.status import text_disk_bytes
from tests.conftest import SMALL_PIPELINE, T2I, run_cli

SMALL = [a for o in SMALL_PIPELINE for a in ("--set", o)]


def overrides(args: list[str]) -> list[str]:
    return [a for a in args if a != "--set"]


@pytest.fixture
def pipeline_ws(small_pipeline_run):
    return small_pipeline_run


def test_run_executes_every_stage_and_prints_where_outputs_are(pipeline_ws):
    ws, proc = pipeline_ws
    plan = Plan(load_config("tiny", overrides(SMALL), str(ws)))
    for label, _, art in plan.artifacts():
        assert art.is_complete(), label
        assert label in proc.stdout and str(art.root) in proc.stdout
    assert [label for label, _, _ in plan.artifacts()] == [
        "download", "cutmix", "recaption", "recaption (composites)", "latents", "text embeddings",
        "latents (composites)", "text embeddings (composites)", "train", "evaluate",
    ]  # fmt: skip
    assert plan.composites.read_manifest()["rows"] == 192
    assert plan.checkpoints.read_manifest()["cutmix_share"] > 0
    assert len(plan.images.read_manifest()["shards"]) == 4
    for name in ("report.md", "metrics.json", "grid.png"):
        assert (plan.evaluation.root / name).is_file()
    assert "| colour_shape |" in (plan.evaluation.root / "report.md").read_text()
    assert len(list((plan.evaluation.root / "images").glob("*.png"))) == 8


def test_second_run_skips_every_stage_and_rewrites_nothing(pipeline_ws, cli_env):
    ws, _ = pipeline_ws
    files = {
        p: (p.stat().st_mtime_ns, p.stat().st_size)
        for p in ws.rglob("*")
        if p.is_file() and "models" not in p.parts
    }
    proc = run_cli(["run", "--preset", "tiny", "--workspace", str(ws), *SMALL], cli_env)
    assert proc.stdout.count("complete (") == 10
    log = proc.stdout + proc.stderr
    for stage in ("download", "cutmix", "recaption", "recaption-composites", "latents", "text", "latents-composites",
                  "text-composites", "train", "evaluate"):  # fmt: skip
        assert f"[{stage}] already complete" in log
    after = {
        p: (p.stat().st_mtime_ns, p.stat().st_size)
        for p in ws.rglob("*")
        if p.is_file() and "models" not in p.parts
    }
    assert after == files


def test_status_reports_each_stage(pipeline_ws, cli_env, tmp_path):
    ws, _ = pipeline_ws
    proc = run_cli(["status", "--preset", "tiny", "--workspace", str(ws), *SMALL], cli_env)
    *lines, text_disk = proc.stdout.strip().splitlines()
    assert text_disk.startswith("precomputed text: ")  # after the stages (test below)
    assert [ln.split()[0] for ln in lines] == [
        "download", "cutmix", "recaption", "recaption", "latents", "text", "latents", "text", "train", "evaluate",
    ]  # fmt: skip
    assert all(" complete " in ln for ln in lines)
    empty = Plan(load_config("tiny", overrides(SMALL), str(tmp_path / "empty")))
    claims = ShardClaims(empty.captions.root)  # this process captions shards 0 and 2, as another node would
    assert claims.take(shard_claim(0)) and claims.take(shard_claim(2))
    fresh = run_cli(["status", "--preset", "tiny", "--workspace", str(tmp_path / "empty"), *SMALL], cli_env)
    assert "not started (0 of 4 shards)" in fresh.stdout and "not started (0 of 20 steps)" in fresh.stdout
    busy = f"partial (0 of 4 shards, 2 in progress ({socket.gethostname()}:{os.getpid()}))"
    assert [ln for ln in fresh.stdout.splitlines() if ln.split("  ")[0] == "recaption"] == [
        f"{'recaption':<28}  {busy:<32}  {empty.captions.root}"
    ]
    claims.release_all()


def test_status_prints_the_disk_the_stored_text_takes_measured(pipeline_ws, cli_env):
    """The tiny preset stores its text: the figure comes from the embeddings' token counts."""
    ws, _ = pipeline_ws
    proc = run_cli(["status", "--preset", "tiny", "--workspace", str(ws), *SMALL], cli_env)
    line = proc.stdout.strip().splitlines()[-1]
    plan = Plan(load_config("tiny", overrides(SMALL), str(ws)))
    texts = [plan.text_of(plan.captions_of(images)) for _, images in plan.image_sets()]
    tokens = [t for art in texts for i in range(4) for t in art.read_shard(i)["tokens"].to_pylist()]
    assert len(tokens) == 384
    mean, dim = sum(tokens) / len(tokens), texts[0].read_manifest()["dim"]
    size = text_disk_bytes(384, mean, dim, "float32")
    count = "384 captions (192 images from the download output + 192 composites)"
    assert line.startswith(f"precomputed text: ~{size / 1e6:.2g} MB for {count}: ")
    assert f"mean {mean:.1f} tokens × {dim} (d_model stored with the text) × 4 bytes (fp32)" in line
    assert "tokens measured over 384 stored embeddings" in line
    assert line.endswith("text.mode=online needs none")
    stored = sum(p.stat().st_size for art in texts for p in art.root.glob("part-*.parquet"))
    assert f"the text artifacts take {stored / 1e6:.2g} MB now" in line


def test_config_prints_the_disk_precomputed_text_will_take(tmp_path):
    """Before any work: per million captions until the source is listed, then for its count; YAML stays YAML
    (the line is a comment) and --json stays JSON (the line goes to stderr)."""
    import json
    from dataclasses import asdict

    import yaml

    from t2i.data.listing import SUMMARY, SourceSummary, spec_dir

    env = {k: v for k, v in os.environ.items() if k != "T2I_WORKSPACE"}
    ws = tmp_path / "ws"
    args = ["config", "--preset", "imagenet256", "--workspace", str(ws)]
    before = run_cli(args, env).stdout.strip().splitlines()[-1]
    assert before.startswith("# precomputed text: ~823 GB per million captions (images unknown until")
    assert "× 2048 (d_model of google/flan-t5-xl) × 2 bytes (bf16)" in before
    assert "estimated from recaption.max_new_tokens=200" in before
    assert not ws.exists()

    source = "folder:/data/imagenet/train"  # ImageNet-1k train as `t2i download` would have listed it
    summary = SourceSummary("folder", source, digest="0" * 64, count=1_281_167, classes=["c"] * 1000)
    path = spec_dir(ws, source, "train", None) / SUMMARY
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(asdict(summary)))
    proc = run_cli(args, env)
    size = text_disk_bytes(2 * 1_281_167, 201, 2048, "bfloat16")
    assert round(size / 1e12, 1) == 2.1
    after = proc.stdout.strip().splitlines()[-1]
    assert after.startswith(
        "# precomputed text: ~2.1 TB for 2.56M captions (1.28M images from the download listing + 1.28M "
        "composites): mean 201 tokens × 2048 (d_model of google/flan-t5-xl) × 2 bytes (bf16)"
    )
    assert yaml.safe_load(proc.stdout) == load_config("imagenet256", [], str(ws)).model_dump(mode="json")
    as_json = run_cli([*args, "--json"], env)
    assert json.loads(as_json.stdout)["text"]["mode"] == "precomputed"
    last = as_json.stderr.strip().splitlines()[-1]
    assert last.startswith("# precomputed text: ~2.1 TB for 2.56M captions")


def test_status_imports_neither_torch_nor_prefect(pipeline_ws, cli_env):
    """`t2i status` is asked often, on every node: it reads manifests and summaries, so importing torch or
    Prefect (seconds each) would be its whole cost."""
    ws, _ = pipeline_ws
    code = (
        "import sys; from t2i.flows.cli import main; "
        f"main(['status', '--preset', 'tiny', '--workspace', {str(ws)!r}, *{SMALL!r}]); "
        "print(sorted(m for m in ('torch', 'prefect', 'vllm', 'transformers', 'diffusers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env=cli_env, capture_output=True, text=True, check=True
    )
    assert " complete " in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_stage_without_its_input_names_the_command_to_run(cli_env, tmp_path):
    ws = tmp_path / "ws"
    proc = run_cli(["latents", "--preset", "tiny", "--workspace", str(ws)], cli_env, check=False)
    assert proc.returncode == 1
    assert "run `t2i download --preset tiny`" in proc.stderr
    assert not ws.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "latents.resolution=-3"], "latents.resolution: Input should be greater than 0"),
        (["--set", "train.colour=red"], "train.colour: unknown field; allowed fields:"),
        (["--preset", "nope"], "unknown preset 'nope'; available: imagenet256, tiny"),
        (
            ["--set", "cluster.parts=2"],
            "parts=2 starts child runs of a deployment, and cluster.deployment is not set",
        ),
    ],
)
def test_bad_input_fails_before_any_work(cli_env, tmp_path, args, message):
    ws = tmp_path / "ws"
    full = (
        ["run", "--workspace", str(ws), *args]
        if "--preset" in args
        else ["run", "--preset", "tiny", "--workspace", str(ws), *args]
    )
    proc = run_cli(full, cli_env, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not ws.exists()


@pytest.mark.parametrize("server", [True, False])
def test_parts_asked_for_on_the_command_line_without_their_deployment_fail_before_any_work(
    cli_env, tmp_path, server
):
    """`cluster.parts` fans out over a deployment's runs; with no server to start them on, or no such
    deployment there, the run is refused naming what is missing, and nothing is computed."""
    ws = tmp_path / "ws"
    env = cli_env if server else {k: v for k, v in cli_env.items() if k != "PREFECT_API_URL"}
    args = ["--set", "cluster.parts=2", "--set", "cluster.deployment=nowhere"]
    proc = run_cli(["run", "--preset", "tiny", "--workspace", str(ws), *args], env, check=False)
    assert proc.returncode == 1
    if server:
        assert "starts runs of 'recaption/nowhere', which the server at http://127.0.0.1:" in proc.stderr
    else:
        assert "starts child runs of the deployment 'nowhere' on a Prefect server" in proc.stderr
    assert not ws.exists()


def _kill_after_first_shard(stage: str, ws, env, artifact, num_shards: int) -> dict:
    """Start `t2i <stage>`, SIGKILL it as soon as its first shard is on disk; return the shards seen then."""
    proc = subprocess.Popen(
        [T2I, stage, "--preset", "tiny", "--workspace", str(ws), *SMALL],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 300
    while not artifact.shard_path(0).exists():
        assert proc.poll() is None, f"t2i {stage} exited before writing a shard"
        assert time.time() < deadline, f"t2i {stage} wrote no shard in 300 s"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {i: (artifact.shard_path(i).read_bytes(), artifact.shard_path(i).stat().st_mtime_ns)
            for i in range(num_shards) if artifact.shard_path(i).exists()}  # fmt: skip


# recaption (the vLLM engine) is SIGKILLed the same way in a worker-run part: tests/service/test_service.py
@pytest.mark.parametrize("stage", ["latents"])
@pytest.mark.slow
def test_sigkill_mid_stage_then_rerun_keeps_finished_shards_and_matches(
    pipeline_ws, cli_env, tmp_path, stage
):
    ref_ws, _ = pipeline_ws
    ws = tmp_path / "ws"
    ref_plan = Plan(load_config("tiny", overrides(SMALL), str(ref_ws)))
    shutil.copytree(ref_ws / "models", ws / "models")
    shutil.copytree(ref_plan.images.root, ws / "download" / ref_plan.images.fingerprint)
    shutil.copytree(ref_plan.composites.root, ws / "cutmix" / ref_plan.composites.fingerprint)
    if stage == "latents":  # the preset's latents stage also embeds the captions
        shutil.copytree(ref_ws / "recaption", ws / "recaption")
    plan = Plan(load_config("tiny", overrides(SMALL), str(ws)))
    artifact, reference = plan.artifact(stage), ref_plan.artifact(stage)
    assert artifact.fingerprint == reference.fingerprint

    before = _kill_after_first_shard(stage, ws, cli_env, artifact, plan.num_shards)
    assert not artifact.is_complete()
    assert 0 < len(before) < plan.num_shards, "the kill landed after the stage finished; nothing was tested"
    leftovers = [
        p.name for p in artifact.root.iterdir() if not p.name.startswith("part-") and p.name != ".claims"
    ]
    assert all(
        name.startswith(".tmp-") for name in leftovers
    )  # only an in-flight temporary, never a torn shard

    run_cli([stage, "--preset", "tiny", "--workspace", str(ws), *SMALL], cli_env)
    assert artifact.is_complete()
    for i, (data, mtime) in before.items():
        assert artifact.shard_path(i).read_bytes() == data
        assert artifact.shard_path(i).stat().st_mtime_ns == mtime
    for i in range(plan.num_shards):
        assert pq.read_table(artifact.shard_path(i)).equals(pq.read_table(reference.shard_path(i)))
    assert not [p for p in artifact.root.iterdir() if p.name.startswith(".tmp-")]

"""Two part workers of one stage on one workspace, one of them posing as another host (its own UTS and pid
namespaces, as a second node sharing the filesystem would be), never remove each other's temporaries, and
both parts complete."""

import subprocess
import sys
from pathlib import Path

import pytest

from t2i.flows.config import load_config
from t2i.flows.plan import Plan
from tests.conftest import REPO, T2I, run_cli
from tests.hosts import OTHER_HOST as OTHER
from tests.hosts import UNSHARE, namespaces_work

SETTINGS = [
    "--set", "download.max_images=64",
    "--set", "download.shard_size=16",
    "--set", "cutmix.enabled=false",
    "--set", "recaption.backend=template",
]  # fmt: skip
# Holds an in-flight temporary until a line arrives on stdin; exits 0 only if the final `os.replace` works.
WRITER = """
import sys
from pathlib import Path
from t2i.data.store import atomic_path
with atomic_path(Path(sys.argv[1])) as tmp:
    tmp.write_bytes(sys.argv[2].encode())
    print(tmp.name, flush=True)
    sys.stdin.readline()
"""


def start_writer(final: Path, text: str, prefix: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [*prefix, sys.executable, "-c", WRITER, str(final), text],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    tmp_name = proc.stdout.readline().strip()
    assert tmp_name.startswith(".tmp-"), f"writer for {final.name} did not start"
    return proc, tmp_name


def ns_init_pid(unshare: subprocess.Popen) -> int:
    """This host's pid of the namespace's init (unshare's forked child), for `nsenter --target`."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare/nsenter and new UTS and pid namespaces")
@pytest.mark.slow
def test_parts_on_two_hosts_keep_each_others_temporaries_and_complete(workspace, cli_env):
    ws = ["--preset", "tiny", "--workspace", str(workspace), *SETTINGS]
    run_cli(["download", *ws], cli_env)
    plan = Plan(load_config("tiny", [a for a in SETTINGS if a != "--set"], str(workspace)))
    root = plan.captions.root
    root.mkdir(parents=True)
    finals = {"here": root / "part-99998.here", OTHER: root / "part-99999.other"}
    writers = {}
    try:
        # The other host's writer is in flight while a part starts here ...
        writers[OTHER] = start_writer(finals[OTHER], OTHER, UNSHARE)
        run_cli(["recaption", "--part", "1/2", *ws], cli_env)
        assert (root / writers[OTHER][1]).is_file(), "this host removed the other host's in-flight temporary"
        # ... and this host's writer is in flight while the other part starts on the other host.
        writers["here"] = start_writer(finals["here"], "here", [])
        other = ["nsenter", "--target", str(ns_init_pid(writers[OTHER][0])), "--uts", "--pid", "--mount"]
        proc = subprocess.run([*other, T2I, "recaption", "--part", "2/2", *ws], env=cli_env,
                              capture_output=True, text=True, timeout=300, cwd=REPO)  # fmt: skip
        assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        assert (root / writers["here"][1]).is_file(), "the other host removed this host's in-flight temporary"
        for proc, _ in writers.values():
            proc.communicate("done\n", timeout=30)
            assert proc.returncode == 0, "a writer's os.replace failed"
    finally:
        for proc, _ in writers.values():
            proc.kill()
            proc.wait()
    assert {host: f.read_text() for host, f in finals.items()} == {"here": "here", OTHER: OTHER}
    assert plan.captions.is_complete()
    manifest = plan.captions.read_manifest()
    assert manifest["rows"] == 64 and len(manifest["shards"]) == plan.num_shards == 4
    assert not [p.name for p in root.iterdir() if p.name.startswith(".tmp-")]

"""Shard claims in a shared folder: of processes racing for a shard (or for a dead holder's shard) exactly one
wins; a dead process's claim on this machine is taken over at once, another machine's only once its
heartbeats have stopped for the timeout; a failed shard is given back at once, a finished one stays claimed as
the record of who computed it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from t2i.data.claims import CLAIMS_DIR, ShardClaims
from t2i.data.store import host_tag
from tests.conftest import REPO
from tests.hosts import OTHER_HOST, UNSHARE, namespaces_work

# Takes `name` in `root` at the same instant as its siblings (all wait for `at`), prints whether it won, then
# holds its claim (heartbeats included) until stdin closes.
RACER = """
import sys, time
from t2i.data.claims import ShardClaims
root, name, at, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
claims = ShardClaims(root, timeout)
time.sleep(max(0.0, at - time.time()))
print(int(claims.take(name)), flush=True)
sys.stdin.read()
"""


def racers(root, name: str, n: int, timeout: float = 300, prefix: tuple = ()) -> list[subprocess.Popen]:
    at = time.time() + 3  # every racer has imported and waits for this instant
    return [
        subprocess.Popen(
            [*prefix, sys.executable, "-c", RACER, str(root), name, str(at), str(timeout)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )  # fmt: skip
        for _ in range(n)
    ]


def winners(procs: list[subprocess.Popen]) -> list[int]:
    return [k for k, p in enumerate(procs) if p.stdout.readline().strip() == "1"]


def finish(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.stdin.close()
        p.wait(timeout=30)


def test_of_processes_racing_for_a_shard_exactly_one_wins(tmp_path):
    procs = racers(tmp_path, "part-00000", 6)
    try:
        assert len(winners(procs)) == 1
    finally:
        finish(procs)
    assert [p.name for p in (tmp_path / CLAIMS_DIR).iterdir()] == ["part-00000.0"]


def test_a_dead_holders_claim_on_this_machine_is_taken_over_at_once_by_one_of_several(tmp_path):
    (holder,) = racers(tmp_path, "part-00003", 1)
    assert winners([holder]) == [0]
    claims = ShardClaims(tmp_path)
    assert not claims.take("part-00003")  # its holder lives
    holder.kill()
    holder.wait()
    procs = racers(tmp_path, "part-00003", 6)  # the first instant the claim is stale, six nodes see it
    try:
        assert len(winners(procs)) == 1
    finally:
        finish(procs)
    names = sorted(p.name for p in (tmp_path / CLAIMS_DIR).iterdir())
    assert names == ["part-00003.0", "part-00003.1"]
    taker = json.loads((tmp_path / CLAIMS_DIR / "part-00003.1").read_text())
    assert taker["pid"] in [p.pid for p in procs]


def test_another_machines_claim_is_taken_over_only_after_the_timeout_without_heartbeat(tmp_path):
    claims = ShardClaims(tmp_path, timeout=30)
    path = tmp_path / CLAIMS_DIR / "part-00001.0"
    path.parent.mkdir()
    record = {"host": "elsewhere", "tag": "0123abcd" if host_tag() != "0123abcd" else "4567cdef",
              "pid": os.getpid(), "start": None, "devices": "3", "claimed": time.time()}  # fmt: skip
    path.write_text(json.dumps(record))
    assert not claims.take("part-00001")  # fresh: its node is alive, whatever our pid table says
    assert claims.live_holder("part-00001").who() == f"elsewhere:{os.getpid()} GPUs 3"
    quiet = time.time() - 31
    os.utime(path, (quiet, quiet))
    assert claims.live_holder("part-00001") is None
    assert claims.take("part-00001")
    assert (tmp_path / CLAIMS_DIR / "part-00001.1").is_file()


def test_a_failed_shard_is_given_back_and_a_finished_one_keeps_its_record(tmp_path):
    mine, other = ShardClaims(tmp_path), ShardClaims(tmp_path)
    assert mine.take("part-00000") and mine.take("part-00001")
    assert not other.take("part-00000")  # another node (here: another object) sees it held
    mine.release("part-00000")
    mine.finish("part-00001")
    assert other.take("part-00000")
    record = json.loads((tmp_path / CLAIMS_DIR / "part-00001.0").read_text())
    assert record["pid"] == os.getpid() and record["tag"] == host_tag()
    other.release_all()
    assert not (tmp_path / CLAIMS_DIR / "part-00000.0").exists()


@pytest.mark.skipif(not namespaces_work(), reason="needs unshare and new UTS and pid namespaces")
def test_a_live_node_keeps_its_claim_by_heartbeat_and_loses_it_when_it_dies(tmp_path):
    """A holder on "another machine" (its own host name and pid namespace): its claim stays fresh for as long
    as it runs, however long the shard takes, and can be taken over a timeout after it is SIGKILLed."""
    timeout = 2.0
    (holder,) = racers(tmp_path, "part-00007", 1, timeout=timeout, prefix=tuple(UNSHARE))
    try:
        assert winners([holder]) == [0]
        claims = ShardClaims(tmp_path, timeout=timeout)
        for _ in range(4):  # twice the timeout in all
            time.sleep(timeout / 2)
            assert not claims.take("part-00007"), "a live node's claim was taken over"
        assert claims.live_holder("part-00007").who().startswith(f"{OTHER_HOST}:")
        holder.kill()
        holder.wait()
        assert not claims.take("part-00007")  # not yet: another machine's process cannot be checked from here
        time.sleep(timeout + 0.5)
        assert claims.take("part-00007")
    finally:
        if holder.poll() is None:
            holder.kill()

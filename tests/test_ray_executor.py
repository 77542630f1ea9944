"""The Ray executor on a real 2-node cluster (two `ray start` nodes in a loopback-only network namespace):
doit decides what is stale, Ray runs it on the nodes, the outputs equal a local build's bit for bit,
and faults (a node killed mid-stage, a node with another toolchain, no head) fail plainly with
nothing half-published."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.manifest import sha256_file
from tests.conftest import copy_project, doit, make_project
from tools.ray_cluster import LoopbackCluster, loopback_namespace_available
from tools.harness import write_dataset

pytestmark = pytest.mark.slow
WHY_NOT = loopback_namespace_available()
needs_namespace = pytest.mark.skipif(WHY_NOT is not None, reason=f"Ray cluster tests: {WHY_NOT}")


def support_reply(r):
    return "Please contact the support desk about " + r["prompt"][:30]


def hotels_reply(r):
    return "Our concierge suggests: " + r["response"][:50]


def adapter_args(project: Path) -> list[str]:
    return [write_dataset(project, "support", support_reply), write_dataset(project, "hotels", hotels_reply)]


def stage_digests(project: Path) -> dict[str, str]:
    """sha256 of every stage's MANIFEST.json (each records its inputs' digests, so equal = same bytes)."""
    build = project / "build/tiny"
    return {p.parent.name: sha256_file(p) for p in build.glob("*/MANIFEST.json")}


def stage_files(project: Path) -> dict[str, dict[str, str]]:
    """Every stage's files and their sha256, less speed.json (decode tokens/s: a timing, the one
    measurement in the package; tests/test_reproducible.py)."""
    out = {}
    for path in (project / "build/tiny").glob("*/MANIFEST.json"):
        files = json.loads(path.read_text())["files"]
        out[path.parent.name] = {name: f["sha256"] for name, f in files.items() if name != "speed.json"}
    return out


def ran(result) -> list[str]:
    return re.findall(r"^\.  (\w+)$", result.stdout, re.MULTILINE)


def built_on(project: Path, stage: str) -> dict:
    return json.loads((project / "build/tiny/provenance" / f"{stage}.json").read_text())["node"]


def wait_until_building(log: Path, started: float, proc: subprocess.Popen) -> None:
    """Until the stage whose log this is has started building (its log written after ``started``)."""
    deadline = time.time() + 300
    while not (log.is_file() and log.stat().st_mtime > started and "building into" in log.read_text()):
        assert proc.poll() is None and time.time() < deadline, f"{log.stem} never started"
        time.sleep(0.2)


def wait_until_gone(pattern: str, seconds: float, why: str) -> None:
    """Until no process's command line matches ``pattern`` (pgrep -f), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while subprocess.run(["pgrep", "-f", pattern], capture_output=True).returncode == 0:
        assert time.monotonic() < deadline, why
        time.sleep(0.5)


class ClusterBuild:
    """One project built with executor.kind = "ray" against the module's cluster."""

    def __init__(self, cluster: LoopbackCluster, project: Path):
        self.cluster, self.project = cluster, project
        self.settings = adapter_args(project) + ["executor.kind=ray", f"executor.address={cluster.address}",
                                                 "cache.enabled=false"]

    def command(self, *extra: str) -> list[str]:
        return [sys.executable, "-m", "doit", *self.settings, *extra]

    def env(self) -> dict:
        return {**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"}

    def doit(self, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
        result = self.cluster.run(self.command(*extra), check=False, cwd=self.project, env=self.env(), timeout=900)
        if check and result.returncode:
            raise AssertionError(f"doit failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
        return result


@pytest.fixture(scope="module")
def cluster():
    if WHY_NOT:
        pytest.skip(WHY_NOT)
    cluster = LoopbackCluster()
    try:
        cluster.start_head("node_a")
        cluster.add_node("node_b")
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def cluster_build(cluster, built_project, tmp_path_factory):
    """The session's tiny build plus two datasets, built on the cluster: the two new adapters' finetunes
    are independent, so Ray runs them side by side on the two nodes. (Every stage goes through the same
    dispatch; the default stages were built locally once for the whole session, which saved CI minutes.)"""
    build = ClusterBuild(cluster, copy_project(built_project, tmp_path_factory.mktemp("ray") / "project"))
    build.first = build.doit()
    return build


@needs_namespace
def test_three_adapters_build_on_two_nodes_with_the_same_bytes_as_a_local_build(cluster_build, built_project, tmp_path):
    assert set(ran(cluster_build.first)) == {"check", "finetune_support", "finetune_hotels", "adapter_support",
                                             "adapter_hotels", "evaluate"}
    assert "running on node 127.0.0.1" in cluster_build.first.stdout  # the nodes' output reached this terminal
    stages = set(ran(cluster_build.first)) - {"check"}
    nodes = {built_on(cluster_build.project, s)["node_id"] for s in stages}
    assert len(nodes) == 2  # independent stages ran on both nodes
    # one doit run is one Ray job: its dispatcher joined the cluster once for all of its stages
    assert len({built_on(cluster_build.project, s)["ray_job"] for s in stages}) == 1

    local = copy_project(built_project, tmp_path / "local")
    doit(local, *adapter_args(local))
    assert stage_files(local) == stage_files(cluster_build.project)
    assert {s: d for s, d in stage_digests(local).items() if s != "package"} == \
        {s: d for s, d in stage_digests(cluster_build.project).items() if s != "package"}


@needs_namespace
def test_changed_dataset_rebuilds_only_its_adapter_on_the_cluster(cluster_build):
    path = cluster_build.project / "data/hotels_qa.jsonl"
    path.write_text(path.read_text().replace("Our concierge suggests", "The concierge recommends"))
    before = stage_digests(cluster_build.project)
    result = cluster_build.doit()
    assert ran(result) == ["check", "finetune_hotels", "adapter_hotels", "evaluate"]
    after = stage_digests(cluster_build.project)
    assert {s for s in after if after[s] != before[s]} == {"finetune_hotels", "adapter_hotels", "package"}
    assert "node_id" in built_on(cluster_build.project, "finetune_hotels")
    assert built_on(cluster_build.project, "finetune_hotels")["ray_job"] != \
        built_on(cluster_build.project, "finetune_support")["ray_job"]  # a new doit run, a new dispatcher


@needs_namespace
def test_the_dispatcher_leaves_with_its_doit_run(cluster, cluster_build):
    # every doit above has returned: its dispatcher (one Ray driver per doit run) saw doit go and left,
    # removing its socket
    wait_until_gone(f"tasks.ray_dispatcher --address {cluster.address} ", 15, "a Ray dispatcher outlived its doit run")
    from tasks.ray_dispatcher import socket_path

    ours = socket_path(cluster.address, 0)  # named <doit pid>-<address key>.sock
    assert not list(ours.parent.glob("*-" + ours.name.partition("-")[2]))


@needs_namespace
def test_node_killed_mid_finetune_fails_the_build_and_the_next_run_redoes_only_that_stage(cluster, cluster_build):
    project = cluster_build.project
    data = project / "data/support_qa.jsonl"
    data.write_text(data.read_text().replace("support desk", "help desk"))
    before = stage_digests(project)
    log = project / "build/tiny/logs/finetune_support.log"
    started = time.time()
    proc = cluster.popen(cluster_build.command("executor.placement.finetune_support.node_b=1"), cwd=project,
                         env=cluster_build.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_building(log, started, proc)
        time.sleep(2)  # inside the training loop
        os.kill(cluster.raylet_pid("node_b"), signal.SIGKILL)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert re.search(r"stage finetune_support failed on the cluster: its (node|worker process) died", output), output[-3000:]
    assert stage_digests(project) == before  # the earlier good output is untouched, nothing partial adopted
    time.sleep(2)
    leftover = subprocess.run(["pgrep", "-f", "tasks stage finetune_support"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""  # the stage process died with its node

    cluster.add_node("node_b")  # the node comes back (a fresh raylet with the same resource)
    again = cluster_build.doit("executor.placement.finetune_support.node_b=1")
    assert ran(again) == ["finetune_support", "adapter_support", "evaluate"]
    assert not list((project / "build/tiny/.staging").glob("finetune_support*"))


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


@needs_namespace
def test_a_stage_whose_worker_dies_runs_again_as_a_new_task_with_executor_retries(cluster_build):
    project = cluster_build.project
    data = project / "data/support_qa.jsonl"
    data.write_text(data.read_text().replace(" desk ", " kiosk "))
    before = stage_digests(project)
    log = project / "build/tiny/logs/finetune_support.log"
    started = time.time()
    proc = cluster_build.cluster.popen(cluster_build.command("executor.retries=1"), cwd=project, env=cluster_build.env(),
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_building(log, started, proc)
        stages = subprocess.run(["pgrep", "-f", "tasks stage finetune_support"], capture_output=True, text=True)
        on_node = [int(p) for p in stages.stdout.split() if _parent(int(p)) != proc.pid]
        assert len(on_node) == 1, stages.stdout
        os.kill(_parent(on_node[0]), signal.SIGKILL)  # the Ray worker running the stage's task
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert re.search(r"finetune_support: its worker process died.*; running it again \(attempt 2 of 2\)", output), \
        output[-3000:]
    assert output.count("finetune_support: running on node") == 2
    after = stage_digests(project)
    assert after["finetune_support"] != before["finetune_support"] and after["finetune"] == before["finetune"]


@needs_namespace
def test_a_stage_process_killed_mid_stage_cancels_its_task_on_the_node(cluster, cluster_build):
    project = cluster_build.project
    before = stage_digests(project)
    log = project / "build/tiny/logs/finetune_support.log"
    started = time.time()
    stage = [sys.executable, "-m", "tasks", "stage", "finetune_support",
             *(a for setting in cluster_build.settings for a in ("--set", setting))]
    # A parent that outlives the stage, in doit's place, keeps the dispatcher up: only the dispatcher's
    # cancel can stop the stage on the node (a dispatcher that leaves ends its Ray job, which would too).
    shell = cluster.popen(["sh", "-c", shlex.join(stage) + "; exec sleep 600"], cwd=project, env=cluster_build.env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    dispatcher = f"tasks.ray_dispatcher --address {cluster.address} --doit-pid {shell.pid} "
    try:
        wait_until_building(log, started, shell)
        client = subprocess.run(["pgrep", "-P", str(shell.pid), "-f", "tasks stage finetune_support"],
                                capture_output=True, text=True).stdout.split()
        assert len(client) == 1, client  # the node runs a process with the same command line
        os.kill(int(client[0]), signal.SIGKILL)
        wait_until_gone("tasks stage finetune_support", 30,
                        "the stage kept running on its node after its stage process was killed")
        assert subprocess.run(["pgrep", "-f", dispatcher], capture_output=True).returncode == 0  # still serving
    finally:
        os.killpg(shell.pid, signal.SIGKILL)
        shell.wait()
    assert stage_digests(project) == before
    wait_until_gone(dispatcher, 15, "the dispatcher outlived the process it served")  # its parent is gone: it leaves


@needs_namespace
def test_node_with_another_toolchain_is_refused(cluster, cluster_build, tmp_path):
    alt = tmp_path / "alt"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(alt),
                              "colorlog==6.8.2"], capture_output=True, text=True)
    if install.returncode:
        pytest.skip(f"could not install a second colorlog version: {install.stderr.strip()[-200:]}")
    cluster.add_node("node_c", env={"PYTHONPATH": str(alt)})
    project = cluster_build.project
    data = project / "data/hotels_qa.jsonl"
    data.write_text(data.read_text().replace("The concierge recommends", "Reception suggests"))
    before = stage_digests(project)
    result = cluster_build.doit("executor.placement.finetune_hotels.node_c=1", check=False)
    assert result.returncode != 0
    assert re.search(r"has a different toolchain than the driver: colorlog 6\.8\.2 on the node vs 6\.\d+\.\d+ on the "
                     r"driver; start every node from the project's image", result.stderr + result.stdout)
    assert stage_digests(project) == before


@needs_namespace
def test_multi_process_finetune_asks_one_node_for_all_its_ranks(cluster, cluster_build):
    # Two ranks need two CPUs on one node; each node here has one, so the stage is refused at once
    # instead of waiting forever in Ray's queue.
    refused = cluster_build.doit("finetune.processes=2", "finetune", check=False)
    assert refused.returncode != 0
    assert re.search(r"no live node of the cluster at 127\.0\.0\.1:\d+ offers what stage finetune asks for "
                     r"\(\{\"num_cpus\": 2(\.0)?, \"num_gpus\": 0\}\)", refused.stderr), refused.stderr[-2000:]
    # Half a CPU per rank fits one node: both ranks run there (torch.distributed over its loopback).
    built = cluster_build.doit("finetune.processes=2", "executor.cpus_per_stage=0.5",
                               "executor.placement.finetune.node_a=1", "finetune")  # that stage alone
    assert ran(built) == ["check", "finetune"]
    assert "2 processes" in (cluster_build.project / "build/tiny/logs/finetune.log").read_text()
    assert "node_id" in built_on(cluster_build.project, "finetune")


def test_unreachable_head_is_one_clear_line(built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    result = doit(project, "executor.kind=ray", "executor.address=127.0.0.1:9", "finetune.rank=4", check=False)
    assert result.returncode != 0
    assert "error: cannot reach the Ray head at 127.0.0.1:9; start it (`ray start --head --port PORT`)" in result.stderr
    assert (project / "build/tiny/finetune/MANIFEST.json").is_file()  # the earlier build is untouched


@needs_namespace
def test_losing_the_head_mid_stage_stops_the_build_plainly(built_project, tmp_path):
    cluster = LoopbackCluster(port=6381)
    try:
        cluster.start_head("node_a")
        project = copy_project(built_project, tmp_path / "project")
        before = stage_digests(project)
        log = project / "build/tiny/logs/finetune.log"
        started = time.time()
        cmd = [sys.executable, "-m", "doit", "finetune.rank=4", "executor.kind=ray", f"executor.address={cluster.address}",
               "executor.head_timeout_s=3", "cache.enabled=false"]
        proc = cluster.popen(cmd, cwd=project, env={**os.environ, "PYTHONWARNINGS": "ignore", "HF_HUB_OFFLINE": "1"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            wait_until_building(log, started, proc)
            os.kill(cluster.gcs_pid(), signal.SIGKILL)
            killed = time.time()
            output, _ = proc.communicate(timeout=120)
            stopped_after = time.time() - killed
        finally:
            if proc.poll() is None:
                proc.kill()
    finally:
        cluster.stop()
    assert proc.returncode != 0
    assert f"error: lost the Ray head at {cluster.address} while finetune ran (unreachable for 3 s); nothing of " \
           "finetune was published" in output, output[-3000:]
    assert stopped_after < 30
    assert stage_digests(project) == before


def test_placement_of_an_unknown_stage_is_refused_before_anything_runs(built_project, tmp_path):
    project = copy_project(built_project, tmp_path / "project")
    result = doit(project, "executor.kind=ray", "executor.address=127.0.0.1:9", "executor.placement.finetun.node_b=1",
                  check=False)
    assert result.returncode != 0
    assert re.search(r"error: executor\.placement names finetun, which is no stage of this build; stages: base, "
                     r"evaluate, export, finetune, quantize", result.stderr), result.stderr[-2000:]


def test_a_dispatcher_folder_open_to_other_users_is_refused(tmp_path):
    # The dispatcher's socket folder must be this user's own and closed to others: a socket planted by
    # someone else would receive the stage requests.
    project = make_project(tmp_path / "project")
    shared_tmp = tmp_path / "tmp"
    folder = shared_tmp / f"ondevice-llm-ray-{os.getuid()}"
    folder.mkdir(parents=True)
    folder.chmod(0o777)
    with socket.socket() as head:  # something listening where the head should be
        head.bind(("127.0.0.1", 0))
        head.listen()
        result = subprocess.run([sys.executable, "-m", "tasks", "stage", "base", "--set", "executor.kind=ray",
                                 "--set", f"executor.address=127.0.0.1:{head.getsockname()[1]}"],
                                cwd=project, capture_output=True, text=True, timeout=120,
                                env={**os.environ, "TMPDIR": str(shared_tmp)})
    assert result.returncode != 0
    assert result.stderr.strip() == f"error: {folder} belongs to another user or is open to others; remove it (it " \
        "only holds the Ray dispatcher's socket) and run doit again", result.stderr
    assert not list(folder.iterdir())


@needs_namespace
def test_a_ray_token_left_in_home_does_not_keep_a_node_out_of_the_test_cluster(tmp_path, monkeypatch):
    # Ray 2.60's head turns token authentication on when ~/.ray/auth_token exists (an earlier local
    # ray.init() writes one); a joining `ray start --address` does not, and was refused. The test cluster
    # pins one auth mode for all its nodes, so such a file does not break the suite.
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("a" * 64)
    monkeypatch.setenv("HOME", str(tmp_path))
    stray = LoopbackCluster(port=6392)
    try:
        stray.start_head()
        stray.add_node("node_b")
        assert stray.alive_nodes() == 2
    finally:
        stray.stop()

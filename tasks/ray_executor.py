"""Run one stale stage as a Ray task (config ``executor.kind = "ray"``).

doit stays the front end: it decides what is stale and calls ``python -m tasks stage NAME`` for each
stale stage, as it does locally. With the Ray executor that process becomes a small Ray driver: it
submits one task with the stage's resources (GPU stages ``num_gpus``, CPU stages ``num_cpus``), and
the task runs the very same ``python -m tasks stage NAME`` on whichever node Ray picks, in the project
folder that every node mounts at the same path (shared storage). Outputs are staged and renamed there
exactly as locally, so a node that dies mid-stage leaves nothing half-written behind.

What the node prints reaches this terminal through Ray's log forwarding. Before a node runs anything
it checks that it sees the project folder and that its installed packages equal the driver's (the
lock's pins): mixing toolchains breaks reproducibility, so such a node refuses.

Faults: a dead worker or node fails the stage with the node named (``executor.retries`` lets Ray
retry it instead); an unreachable head stops the build after ``executor.head_timeout_s``. Either way
nothing is published, and the next ``doit`` rebuilds exactly the stages that did not finish.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from tasks.config import PipelineConfig
from tasks.errors import PipelineError
from tasks.paths import Paths
from tasks.provenance import NODE_ENV, lock_path
from tasks.stages import stages_for
from tasks.workspace_lock import die_with_parent

NAMESPACE = "ondevice-llm-build"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def on_node() -> bool:
    """Set on the node for the stage process (run the stage here; provenance records the node)."""
    return bool(os.environ.get(NODE_ENV))


# --- toolchain identity -------------------------------------------------------------------------

def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_names(lock: Path) -> list[str]:
    """Distribution names pinned by a lock file (requirements/<variant>.lock.txt)."""
    names = {_norm(m.group(1)) for line in lock.read_text(encoding="utf-8").splitlines() if (m := _PIN.match(line))}
    return sorted(names)


def installed_versions(names: list[str]) -> dict[str, str | None]:
    """What this Python environment has installed of ``names`` (None: not installed)."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def toolchain_differences(driver: dict[str, str | None], node: dict[str, str | None]) -> list[str]:
    return [f"{name} {node.get(name) or 'missing'} on the node vs {version or 'missing'} on the driver"
            for name, version in sorted(driver.items()) if node.get(name) != version]


# --- what a stage asks of the cluster -----------------------------------------------------------

def stage_resources(name: str, cfg: PipelineConfig) -> dict:
    """Ray options of a stage: GPUs for stages that compute on the GPU, CPUs otherwise, plus the
    config's placement resources. A multi-process finetune asks for one GPU (or CPU) per process,
    all on one node, since its ranks talk over loopback."""
    stage = {s.name: s for s in stages_for(cfg)}[name]
    processes = stage.processes(cfg)
    options: dict = {"num_cpus": cfg.executor.cpus_per_stage * processes, "num_gpus": 0}
    if stage.gpu(cfg):
        options["num_gpus"] = processes
    if cfg.executor.memory_gb:
        options["memory"] = int(cfg.executor.memory_gb * 2**30)
    extra = cfg.executor.placement.get(name)
    if extra:
        options["resources"] = dict(extra)
    return options


def check_placement_names(cfg: PipelineConfig) -> None:
    names = {s.name for s in stages_for(cfg)}
    unknown = sorted(set(cfg.executor.placement) - names)
    if unknown:
        raise PipelineError(f"executor.placement names {', '.join(unknown)}, which is no stage of this build; "
                            f"stages: {', '.join(sorted(names))}")


def _feasible(options: dict, nodes: list[dict]) -> bool:
    wanted = {"CPU": options["num_cpus"], "GPU": options["num_gpus"], **options.get("resources", {})}
    if "memory" in options:
        wanted["memory"] = options["memory"]
    for node in nodes:
        have = node.get("Resources", {})
        if node.get("Alive") and all(have.get(k, 0) >= v for k, v in wanted.items() if v):
            return True
    return False


# --- the task on the node -----------------------------------------------------------------------


def run_on_node(root: str, argv: list[str], driver_python: str, driver_toolchain: dict, extra_env: dict) -> dict:
    """Body of the Ray task: refuse a node that cannot reproduce the build, else run the stage here."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    # The address the node joined the cluster with (what `ray status` shows), not a guess from routes.
    ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id), ray.util.get_node_ip_address())
    node = {"node_id": node_id, "ip": ip, "hostname": socket.gethostname()}
    where = f"node {node['ip']} ({node['hostname']}, id {node['node_id'][:12]})"
    if not (Path(root) / "dodo.py").is_file():
        return {"refused": f"{where} does not see the project at {root}; mount the shared project folder at the "
                           "same path on every node", "node": node}
    if platform.python_version() != driver_python:
        return {"refused": f"{where} runs Python {platform.python_version()}, the driver {driver_python}; start "
                           "every node from the project's image", "node": node}
    differences = toolchain_differences(driver_toolchain, installed_versions(sorted(driver_toolchain)))
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        return {"refused": f"{where} has a different toolchain than the driver: {'; '.join(differences[:3])}{more}; "
                           "start every node from the project's image (README: Scaling out) so that all run the "
                           "same lock", "node": node}
    print(f"{argv[3]}: running on {where}", flush=True)
    env = {**os.environ, **extra_env, NODE_ENV: json.dumps(node, sort_keys=True)}
    start = time.monotonic()
    # The node's own interpreter (the image's), not the driver's path to one.
    proc = subprocess.run([sys.executable, *argv], cwd=root, env=env, preexec_fn=die_with_parent)
    return {"returncode": proc.returncode, "node": node, "seconds": round(time.monotonic() - start, 2)}


# --- the driver side ----------------------------------------------------------------------------

def _head_reachable(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False


def _driver_toolchain(root: Path) -> dict[str, str | None]:
    lock = lock_path(root)
    if not lock.is_file():
        raise PipelineError(f"{lock} is missing; the Ray executor compares every node against the driver's lock")
    return installed_versions(lock_names(lock))


# Environment a stage process needs from the driver (credentials are never sent: stages need none).
_PASS_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONHASHSEED", "OMP_NUM_THREADS", "OMP_WAIT_POLICY")


def dispatch(name: str, cfg: PipelineConfig, paths: Paths, stage_argv: list[str]) -> None:
    """Run ``python -m tasks stage NAME ...`` for ``name`` as a Ray task; return when it published,
    raise PipelineError (one line, node named) when it did not."""
    dispatch_started = time.monotonic()
    check_placement_names(cfg)
    address = cfg.executor.address
    # Our own head watchdog reports a lost head; keep Ray from killing this process first.
    os.environ.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(int(cfg.executor.head_timeout_s) + 60))
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if not _head_reachable(address):
        raise PipelineError(f"cannot reach the Ray head at {address}; start it (`ray start --head --port PORT`) "
                            "or fix executor.address")
    import ray

    try:
        ray.init(address=address, namespace=NAMESPACE, log_to_driver=True, logging_level="WARNING",
                 configure_logging=True)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError or its own types here
        raise PipelineError(f"cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}") from None
    options = stage_resources(name, cfg)
    if not _feasible(options, ray.nodes()):
        raise PipelineError(f"no live node of the cluster at {address} offers what stage {name} asks for "
                            f"({json.dumps(options, sort_keys=True)}); start a node with those resources or change "
                            "executor.placement / build.device")
    remote = ray.remote(run_on_node).options(name=name, max_retries=cfg.executor.retries, retry_exceptions=False,
                                             **options)
    extra_env = {k: os.environ[k] for k in _PASS_ENV if k in os.environ}
    ref = remote.remote(str(paths.root), stage_argv, platform.python_version(), _driver_toolchain(paths.root),
                        extra_env)
    unreachable_since = None
    try:
        while True:
            done, _ = ray.wait([ref], timeout=1.0)
            if done:
                break
            if _head_reachable(address):
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
            elif time.monotonic() - unreachable_since > cfg.executor.head_timeout_s:
                print(f"error: lost the Ray head at {address} while {name} ran (unreachable for "
                      f"{cfg.executor.head_timeout_s:.0f} s); nothing of {name} was published; restart the head "
                      "and its nodes, then run doit again (finished stages are kept)", file=sys.stderr, flush=True)
                os._exit(3)  # ray.shutdown() would wait on the dead head
        result = ray.get(ref)
    except KeyboardInterrupt:
        ray.cancel(ref, force=True)
        raise
    except ray.exceptions.RayError as exc:
        raise PipelineError(f"stage {name} failed on the cluster: {_ray_failure(exc)}; nothing of it was published; "
                            "run doit again to rebuild it (finished stages are kept)") from None
    finally:
        time.sleep(0.3)  # let the log forwarder print the node's last lines
    if "refused" in result:
        raise PipelineError(result["refused"])
    if result["returncode"]:
        raise PipelineError(f"stage {name} failed on node {result['node']['ip']} ({result['node']['hostname']}); "
                            f"its error is above, its log in {paths.log(name)}")
    total = time.monotonic() - dispatch_started
    print(f"{name}: {total:.1f}s on the cluster, {result['seconds']:.1f}s of it the stage on node "
          f"{result['node']['ip']} ({total - result['seconds']:.1f}s joining, scheduling, starting)", file=sys.stderr,
          flush=True)
    ray.shutdown()


def _ray_failure(exc: Exception) -> str:
    kind = type(exc).__name__
    text = " ".join(str(exc).split())
    if "NodeDied" in kind or "node" in text.lower() and "died" in text.lower():
        what = "its node died"
    elif "WorkerCrashed" in kind or "worker died" in text.lower():
        what = "its worker process died"
    elif "TaskCancelled" in kind:
        what = "it was cancelled"
    else:
        what = kind
    node = re.search(r"node (?:ID|id)[: ]+([0-9a-f]{8,})", text) or re.search(r"(\d+\.\d+\.\d+\.\d+)", text)
    return f"{what}{f' (node {node.group(1)[:12]})' if node else ''} [{kind}]"

"""Run one stale stage as a Ray task (config ``executor.kind = "ray"``).

doit stays the front end: it decides what is stale and calls ``python -m tasks stage NAME`` for each
stale stage, as it does locally. With the Ray executor that process hands the stage to the doit run's
Ray dispatcher (tasks/ray_dispatcher.py: one Ray driver per doit run, started by the first stage, so
that neither doit nor the stage process imports Ray or joins the cluster). The dispatcher submits one
task with the stage's resources (GPU stages ``num_gpus``, CPU stages ``num_cpus``), and the task runs
the very same ``python -m tasks stage NAME`` on whichever node Ray picks, in the project folder that
every node mounts at the same path (shared storage). Outputs are staged and renamed there exactly as
locally, so a node that dies mid-stage leaves nothing half-written behind.

What the node prints streams back to this terminal (the task is a Ray streaming generator). Before a node runs anything
it checks that it sees the project folder and that its installed packages equal the driver's (the
lock's pins): mixing toolchains breaks reproducibility, so such a node refuses.

Faults: a dead worker or node fails the stage with the node named (``executor.retries`` lets Ray
retry it instead); an unreachable head stops the build after ``executor.head_timeout_s``. Either way
nothing is published, and the next ``doit`` rebuilds exactly the stages that did not finish.
"""

from __future__ import annotations

import codecs
import json
import os
import platform
import queue
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
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

_NODE_FACTS: dict = {}  # per worker process: Ray reuses a job's workers, so each fact is looked up once


def _node_facts(names: tuple[str, ...]) -> tuple[dict, dict]:
    import ray

    if "node" not in _NODE_FACTS:
        node_id = ray.get_runtime_context().get_node_id()
        # The address the node joined the cluster with (what `ray status` shows), not a guess from routes.
        ip = next((n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id),
                  ray.util.get_node_ip_address())
        # The job is the doit run's dispatcher (a worker serves one job only, so this can be kept too).
        _NODE_FACTS["node"] = {"node_id": node_id, "ip": ip, "hostname": socket.gethostname(),
                               "ray_job": ray.get_runtime_context().get_job_id()}
    if names not in _NODE_FACTS:
        _NODE_FACTS[names] = installed_versions(list(names))
    return _NODE_FACTS["node"], _NODE_FACTS[names]


def _pipe_reader(fd: int, stream: str, out: queue.Queue) -> None:
    while chunk := os.read(fd, 65536):
        out.put((stream, chunk))
    out.put((stream, None))


def run_on_node(root: str, argv: list[str], driver_python: str, driver_toolchain: dict, extra_env: dict):
    """Body of the Ray task (a streaming generator): refuse a node that cannot reproduce the build,
    else run the stage here, yielding what it prints as it prints it, then its result."""
    node, versions = _node_facts(tuple(sorted(driver_toolchain)))
    where = f"node {node['ip']} ({node['hostname']}, id {node['node_id'][:12]})"
    if not (Path(root) / "dodo.py").is_file():
        yield {"refused": f"{where} does not see the project at {root}; mount the shared project folder at the "
                          "same path on every node", "node": node}
        return
    if platform.python_version() != driver_python:
        yield {"refused": f"{where} runs Python {platform.python_version()}, the driver {driver_python}; start "
                          "every node from the project's image", "node": node}
        return
    differences = toolchain_differences(driver_toolchain, versions)
    if differences:
        more = f" (and {len(differences) - 3} more)" if len(differences) > 3 else ""
        yield {"refused": f"{where} has a different toolchain than the driver: {'; '.join(differences[:3])}{more}; "
                          "start every node from the project's image (README: Scaling out) so that all run the "
                          "same lock", "node": node}
        return
    yield {"out": f"{argv[3]}: running on {where}\n", "stream": "stdout"}
    env = {**os.environ, **extra_env, NODE_ENV: json.dumps(node, sort_keys=True)}
    start = time.monotonic()
    # The node's own interpreter (the image's), not the driver's path to one.
    proc = subprocess.Popen([sys.executable, *argv], cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=die_with_parent)
    chunks: queue.Queue = queue.Queue()
    for pipe, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        threading.Thread(target=_pipe_reader, args=(pipe.fileno(), stream, chunks), daemon=True).start()
    decoders = {s: codecs.getincrementaldecoder("utf-8")("replace") for s in ("stdout", "stderr")}
    open_pipes, drain_until = 2, None
    while open_pipes:
        if drain_until is None and proc.poll() is not None:
            # A process the stage left behind could hold its pipes open: it must not hold the task too.
            drain_until = time.monotonic() + 5
        wait = 0.5 if drain_until is None else drain_until - time.monotonic()
        if wait <= 0:
            break
        try:
            stream, chunk = chunks.get(timeout=wait)
        except queue.Empty:
            continue
        if chunk is None:
            open_pipes -= 1
            continue
        yield {"out": decoders[stream].decode(chunk), "stream": stream}
    for stream, decoder in decoders.items():
        if tail := decoder.decode(b"", final=True):  # a character cut at the very end
            yield {"out": tail, "stream": stream}
    returncode = proc.wait()
    yield {"returncode": returncode, "node": node, "seconds": round(time.monotonic() - start, 2)}


# --- the driver side: the stage process doit runs ---------------------------------------------------

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


def _connect_dispatcher(cfg: PipelineConfig, paths: Paths) -> socket.socket:
    """A connection to this doit run's dispatcher (tasks/ray_dispatcher.py), started here if it is not
    running yet. Stages that doit starts side by side take a file lock, so that one dispatcher starts."""
    import fcntl

    from tasks.ray_dispatcher import READY, socket_path

    address = cfg.executor.address
    doit_pid = os.getppid()  # doit runs this process directly: its parent is doit
    path = socket_path(address, doit_pid)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    owner = os.lstat(path.parent)  # not followed: a link to a folder of ours must not pass for it
    if not stat.S_ISDIR(owner.st_mode) or owner.st_uid != os.getuid() or owner.st_mode & 0o077:
        # another user's folder (or a link planted there): their socket could answer our stages
        raise PipelineError(f"{path.parent} belongs to another user or is open to others; remove it (it only "
                            "holds the Ray dispatcher's socket) and run doit again")
    fd = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
            return conn
        except (FileNotFoundError, ConnectionRefusedError):
            path.unlink(missing_ok=True)  # left by a dispatcher that was killed
        env = dict(os.environ)
        # Our own head watchdog reports a lost head; keep Ray from killing the dispatcher first.
        env.setdefault("RAY_gcs_rpc_server_reconnect_timeout_s", str(int(cfg.executor.head_timeout_s) + 60))
        log = paths.log("ray-dispatcher")
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as sink:  # Ray's own warnings go to the log; stdout carries READY or one error
            proc = subprocess.Popen([sys.executable, "-m", "tasks.ray_dispatcher", "--address", address,
                                     "--doit-pid", str(doit_pid), "--socket", str(path)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=sink, env=env,
                                    start_new_session=True, text=True)
        limit = 60 + cfg.executor.head_timeout_s
        deadline, line = time.monotonic() + limit, ""
        while line.strip() != READY and not line.startswith("error: "):
            if not select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: the dispatcher and nothing else
                proc.wait()
                raise PipelineError(f"the Ray dispatcher did not join the cluster at {address} within {limit:.0f} s; "
                                    f"see {log}")
            line = proc.stdout.readline()
            if not line:
                break
        proc.stdout.close()
        if line.strip() != READY:
            proc.wait()
            if line.startswith("error: "):
                raise PipelineError(line.strip().removeprefix("error: "))
            raise PipelineError(f"the Ray dispatcher did not start (exit {proc.returncode}); see {log}")
        conn.connect(str(path))
        return conn


class _Relay:
    """What the node prints, written to this process's stdout and stderr in whole lines: stages that doit
    runs side by side then interleave line by line, as local stages do, never inside a line."""

    def __init__(self):
        self.pending = {"stdout": "", "stderr": ""}

    def write(self, stream: str, text: str) -> None:
        done, newline, self.pending[stream] = (self.pending[stream] + text).rpartition("\n")
        if newline:
            self._emit(stream, done + newline)

    def flush(self) -> None:
        for stream, text in self.pending.items():
            if text:
                self._emit(stream, text + "\n")
            self.pending[stream] = ""

    @staticmethod
    def _emit(stream: str, text: str) -> None:
        out = sys.stdout if stream == "stdout" else sys.stderr
        out.write(text)
        out.flush()


def dispatch(name: str, cfg: PipelineConfig, paths: Paths, stage_argv: list[str]) -> None:
    """Run ``python -m tasks stage NAME ...`` for ``name`` as a Ray task; return when it published,
    raise PipelineError (one line, node named) when it did not."""
    dispatch_started = time.monotonic()
    check_placement_names(cfg)
    address = cfg.executor.address
    if not _head_reachable(address):
        raise PipelineError(f"cannot reach the Ray head at {address}; start it (`ray start --head --port PORT`) "
                            "or fix executor.address")
    conn = _connect_dispatcher(cfg, paths)
    request = {"name": name, "root": str(paths.root), "argv": stage_argv, "options": stage_resources(name, cfg),
               "retries": cfg.executor.retries, "env": {k: os.environ[k] for k in _PASS_ENV if k in os.environ}}
    conn.sendall((json.dumps(request) + "\n").encode())
    conn.settimeout(1.0)
    buffer, result, unreachable_since, relay = b"", None, None, _Relay()
    with conn:
        while result is None:
            try:
                data = conn.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                relay.flush()
                raise PipelineError(f"the Ray dispatcher stopped while {name} ran; nothing of {name} was published; "
                                    f"see {paths.log('ray-dispatcher')}, then run doit again")
            if data:
                buffer += data
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    message = json.loads(line)
                    if "out" in message:
                        relay.write(message["stream"], message["out"])
                    else:
                        result = message
                continue
            if _head_reachable(address):
                unreachable_since = None
            elif unreachable_since is None:
                unreachable_since = time.monotonic()
            elif time.monotonic() - unreachable_since > cfg.executor.head_timeout_s:
                relay.flush()
                print(f"error: lost the Ray head at {address} while {name} ran (unreachable for "
                      f"{cfg.executor.head_timeout_s:.0f} s); nothing of {name} was published; restart the head "
                      "and its nodes, then run doit again (finished stages are kept)", file=sys.stderr, flush=True)
                os._exit(3)
    relay.flush()
    if "error" in result:
        raise PipelineError(result["error"])
    if "refused" in result:
        raise PipelineError(result["refused"])
    if result["returncode"]:
        raise PipelineError(f"stage {name} failed on node {result['node']['ip']} ({result['node']['hostname']}); "
                            f"its error is above, its log in {paths.log(name)}")
    total = time.monotonic() - dispatch_started
    print(f"{name}: {total:.2f}s on the cluster, {result['seconds']:.2f}s of it the stage on node "
          f"{result['node']['ip']} ({total - result['seconds']:.2f}s dispatching)", file=sys.stderr, flush=True)


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

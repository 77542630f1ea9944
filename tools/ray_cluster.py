"""A real Ray cluster of several nodes on this machine, inside a network namespace with only loopback.

Outside such a namespace Ray also talks to the machine's own address; inside one, all of its traffic
stays on 127.0.0.1. Needs root (unshare -n). Each node is a `ray start` with a custom resource named
after it, so a config can place a stage on a chosen node (executor.placement). Used by the tests and
by bench/scale_out.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# Ray 2.60's `ray start --head` turns token authentication on when ~/.ray/auth_token exists (any local
# `ray.init()` writes one), but `ray start --address` does not, so a node joining that head is refused
# ("InvalidAuthToken"). This cluster lives in a loopback-only namespace: every node runs without it.
AUTH_MODE = "disabled"


def loopback_namespace_available() -> str | None:
    """None when a loopback-only namespace can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root for unshare -n"
    if not (shutil.which("unshare") and shutil.which("nsenter") and shutil.which("ip")):
        return "needs unshare, nsenter and ip (util-linux, iproute2)"
    probe = subprocess.run(["unshare", "-n", "ip", "link", "set", "lo", "up"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare -n failed: {probe.stderr.strip()}"


class LoopbackCluster:
    def __init__(self, port: int = 6380):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
        self.holder = subprocess.Popen(["unshare", "-n", "sh", "-c", "ip link set lo up && exec sleep infinity"],
                                       start_new_session=True)
        for _ in range(100):
            if self.run(["ip", "-o", "link", "show", "lo"], check=False).stdout.count("UP"):
                break
            time.sleep(0.05)
        self.nodes: dict[str, int] = {}

    def _enter(self, cmd: list[str]) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", "--", *cmd]

    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
        result = subprocess.run(self._enter(cmd), capture_output=True, text=True, env=env, **kw)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def popen(self, cmd: list[str], **kw) -> subprocess.Popen:
        return subprocess.Popen(self._enter(cmd), **kw)

    def _ray_start(self, name: str, extra: list[str], cpus: int, env: dict | None) -> None:
        resources = json.dumps({name: 1})
        self.run([RAY, "start", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}", "--num-gpus=0",
                  f"--resources={resources}", "--disable-usage-stats", *extra],
                 env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": AUTH_MODE, **(env or {})})
        self.nodes[name] = cpus

    def start_head(self, name: str = "node_a", cpus: int = 1) -> None:
        self._ray_start(name, ["--head", f"--port={self.port}", "--include-dashboard=false",
                               f"--temp-dir={self.temp}"], cpus, None)

    def add_node(self, name: str, cpus: int = 1, env: dict | None = None) -> None:
        # Its own temp dir: each node's session files and logs stay in a folder of its own.
        self._ray_start(name, [f"--address={self.address}", f"--temp-dir={self.temp / name}"], cpus, env)
        # Wait until the head lists the node as alive, so that a stage placed on it is feasible.
        for _ in range(100):
            if self.alive_nodes() >= len(self.nodes):
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {name} did not join {self.address}")

    def alive_nodes(self) -> int:
        code = ("import ray; ray.init(address='%s', logging_level='ERROR', log_to_driver=False); "
                "print(sum(n['Alive'] for n in ray.nodes()))" % self.address)
        result = self.run([sys.executable, "-c", code], check=False)
        try:
            return int(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return 0

    @staticmethod
    def _pid(binary: bytes, needle: str) -> int:
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if cmdline and cmdline[0].endswith(binary) and any(needle.encode() in part for part in cmdline):
                return int(proc.name)
        raise LookupError(f"no {binary.decode()} process with {needle} in its arguments")

    def raylet_pid(self, name: str) -> int:
        """The raylet process of the node started with resource ``name``."""
        return self._pid(b"raylet", name)

    def gcs_pid(self) -> int:
        """The head's GCS server (the cluster's control store; what "the head" is to a driver)."""
        return self._pid(b"gcs_server", str(self.temp))

    def stop(self) -> None:
        self.run([RAY, "stop", "--force"], check=False)
        with_holder = self.holder
        if with_holder.poll() is None:
            os.killpg(with_holder.pid, signal.SIGKILL)
            with_holder.wait()
        shutil.rmtree(self.temp, ignore_errors=True)

"""One Ray driver for a whole doit run, so that a stage does not pay for joining the cluster.

Each stale stage is still its own ``python -m tasks stage NAME`` process under doit (tasks/ray_executor.py),
but that process no longer imports Ray or joins the cluster. It asks this dispatcher, over a Unix
socket, to run the stage: the first stage of a doit run starts the dispatcher, which joins the cluster
once (``ray.init``), and every later stage of the same run reuses that connection and the job's warm
worker processes. Ray never enters doit's own process.

The dispatcher lives as long as the doit process whose stages it serves (it polls that pid: the
parent of the stage process that started it) and exits when it goes. Its socket is named after doit's pid and the
cluster address, in a private folder of the temp directory, and removed when it exits.

Protocol (one JSON object per line): the stage process sends its request; the dispatcher answers
with ``{"out": text, "stream": "stdout"|"stderr"}`` lines as the node prints, then one final line,
``{"result": ...}`` or ``{"error": one line}``. A stage process that goes away (Ctrl-C, killed)
closes its connection, and the dispatcher cancels that stage's Ray task.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path

from tasks.workspace_lock import pid_alive

READY = "ready"


def socket_path(address: str, doit_pid: int) -> Path:
    """Where the dispatcher of this doit run and cluster listens (short: Unix socket paths must fit 107 bytes)."""
    key = hashlib.sha256(address.encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"ondevice-llm-ray-{os.getuid()}" / f"{doit_pid}-{key}.sock"


class Dispatcher:
    """The Ray driver: runs stage requests as Ray tasks and streams what the node prints back."""

    def __init__(self, address: str):
        self.address = address
        self.toolchains: dict[str, dict] = {}
        self.lock = threading.Lock()

    def toolchain(self, root: str) -> dict:
        from tasks.ray_executor import _driver_toolchain

        with self.lock:
            if root not in self.toolchains:
                self.toolchains[root] = _driver_toolchain(Path(root))
            return self.toolchains[root]

    def run(self, request: dict, send, cancelled: threading.Event) -> None:
        """Run one stage; on a node or worker that dies, run it again up to ``retries`` times. (The retry is
        ours, not Ray's: Ray retries a streaming generator by skipping the items it already returned, which
        for a stage's output, chunked differently every run, would splice two runs' text.)"""
        import ray

        from tasks.errors import PipelineError
        from tasks.ray_executor import _feasible, _ray_failure

        name, options = request["name"], request["options"]
        try:
            toolchain = self.toolchain(request["root"])
        except PipelineError as exc:
            send({"error": str(exc)})
            return
        attempts = request["retries"] + 1
        for attempt in range(1, attempts + 1):
            if not _feasible(options, ray.nodes()):
                send({"error": f"no live node of the cluster at {self.address} offers what stage {name} asks for "
                               f"({json.dumps(options, sort_keys=True)}); start a node with those resources or "
                               "change executor.placement / build.device"})
                return
            failure = self._attempt(request, toolchain, send, cancelled)
            if failure is None or cancelled.is_set():
                return
            if attempt < attempts and not isinstance(failure, (ray.exceptions.RayTaskError,
                                                                ray.exceptions.TaskCancelledError)):
                send({"out": f"{name}: {_ray_failure(failure)}; running it again (attempt {attempt + 1} of "
                             f"{attempts})\n", "stream": "stderr"})
                continue
            send({"error": f"stage {name} failed on the cluster: {_ray_failure(failure)}; nothing of it was "
                           "published; run doit again to rebuild it (finished stages are kept)"})
            return

    def _attempt(self, request: dict, toolchain: dict, send, cancelled: threading.Event):
        """One Ray task for the stage; None when its result was sent, else the Ray error that ended it."""
        import platform

        import ray

        from tasks.ray_executor import run_on_node

        remote = ray.remote(run_on_node).options(name=request["name"], max_retries=0, **request["options"])
        stream = remote.remote(request["root"], request["argv"], platform.python_version(), toolchain,
                               request["env"])
        done = threading.Event()
        threading.Thread(target=self._cancel_when, args=(cancelled, done, stream), daemon=True).start()
        final = None
        try:
            for ref in stream:
                item = ray.get(ref)
                if "refused" in item or "returncode" in item:
                    final = item
                else:
                    send(item)
        except ray.exceptions.RayError as exc:
            return exc
        # The task has returned (its worker is free for the next stage) before the stage hears back.
        done.set()
        send(final or {"error": f"stage {request['name']} ended on the cluster without a result; run doit again"})
        return None

    @staticmethod
    def _cancel_when(cancelled: threading.Event, done: threading.Event, stream) -> None:
        """Cancel the stage's task when its stage process went away before the task finished."""
        import ray

        cancelled.wait()
        if done.is_set():
            return
        try:
            ray.cancel(stream, force=True)
        except Exception:  # finished or gone in the meantime: nothing to cancel
            pass


def _handler(dispatcher: Dispatcher):
    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline()
            if not line:
                return
            request = json.loads(line)
            cancelled = threading.Event()
            write_lock = threading.Lock()

            def send(message: dict) -> None:
                with write_lock:
                    self.wfile.write((json.dumps(message) + "\n").encode())
                    self.wfile.flush()

            def watch_client() -> None:  # EOF: the stage process is gone; its task must not run on
                self.rfile.read()
                cancelled.set()

            threading.Thread(target=watch_client, daemon=True).start()
            try:
                dispatcher.run(request, send, cancelled)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the stage process is gone; `cancelled` (set below) cancels its task
            except Exception as exc:  # a bug or a Ray call failing here: the stage gets one line, not a hang
                from tasks.runner import one_line

                with contextlib.suppress(OSError):
                    send({"error": f"the Ray dispatcher failed while running {request.get('name')}: "
                                   f"{one_line(exc)}; nothing of it was published; run doit again"})
            finally:
                cancelled.set()
    return Handler


class _Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True  # a handler thread never keeps the process alive


def serve(address: str, doit_pid: int, path: Path) -> int:
    """Join the cluster, say READY on stdout (or one ``error:`` line), then serve until doit exits."""
    import ray

    from tasks.ray_executor import NAMESPACE

    try:
        ray.init(address=address, namespace=NAMESPACE,
                 log_to_driver=False, logging_level="WARNING", configure_logging=True)
    except Exception as exc:  # ray raises ConnectionError, RuntimeError or its own types here
        print(f"error: cannot join the Ray cluster at {address}: {str(exc).splitlines()[0]}", flush=True)
        return 1
    dispatcher = Dispatcher(address)
    server = _Server(str(path), _handler(dispatcher))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        print(READY, flush=True)
        # From here on, what this process prints goes to the log (stderr already does), not to the first
        # stage's pipe, which closes when that stage ends.
        os.dup2(2, 1)
        while pid_alive(doit_pid):
            time.sleep(0.5)
    finally:
        path.unlink(missing_ok=True)
        path.with_suffix(".lock").unlink(missing_ok=True)  # doit is gone: no stage of its run can be waiting on it
        # ray.shutdown() can wait on a dead head for minutes; give it a few seconds, then leave.
        closer = threading.Thread(target=ray.shutdown, daemon=True)
        closer.start()
        closer.join(5)
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.ray_dispatcher", description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True)
    parser.add_argument("--doit-pid", type=int, required=True)
    parser.add_argument("--socket", type=Path, required=True)
    args = parser.parse_args(argv)
    return serve(args.address, args.doit_pid, args.socket)


if __name__ == "__main__":
    sys.exit(main())

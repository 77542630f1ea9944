"""Build the toolchain image (docker/Dockerfile) and run commands in it; doit's `image` and
`incontainer` tasks call this module's command line.

    python -m tasks.image build [--target runtime|dev] [--variant cuda|cpu] [--base IMAGE]
                                [--extra-ca FILE] [--iidfile build/image/runtime-cuda.id]
    python -m tasks.image run   [--iidfile FILE | --image ID] [--gpus auto|all|none] -- doit ...
    python -m tasks.image check [--gpus auto|all|none]      is Docker (and the GPU runtime) usable?

Build path: the docker CLI as a subprocess with BuildKit (DOCKER_BUILDKIT=1), not the docker Python
SDK. The SDK's build API drives the legacy builder and cannot do BuildKit builds (docker/docker-py
#2230), and the Dockerfile needs BuildKit: a secret mount for the optional extra CA (so it never lands
in a layer), a cache mount for pip downloads, tmpfs and bind mounts. Debian's `docker.io` client
(/usr/bin/docker) has BuildKit built in; Docker CE's client needs its buildx plugin.

Environment (all optional): PIPELINE_DOCKER (client path), PIPELINE_DOCKER_NETWORK (e.g. `host`,
passed to build and run: for hosts whose Docker bridge is off), PIPELINE_EXTRA_CA (PEM file for a
TLS-intercepting proxy), PIPELINE_IMAGE_BASE, PIPELINE_IMAGE_VARIANT. HF_TOKEN, when set, is passed
to `run` by name only (never on a command line, never into the image).

Only the standard library is imported here: doit loads this on every invocation.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Sequence
from urllib.parse import urlsplit, urlunsplit

from tasks.paths import (ENV_BUILD_LOCK_HELD, ENV_DOCKER, ENV_DOCKER_NETWORK, ENV_EXTRA_CA, ENV_IMAGE_BASE, ENV_IMAGE_ID,
                         ENV_IMAGE_VARIANT, IMAGE_FOLDER, image_id_file)
from tasks.errors import PipelineError

DOCKERFILE = Path("docker/Dockerfile")
IMAGE_NAME = "ondevice-llm-build"
TARGETS = ("runtime", "dev", "deps")   # deps: the os + dependency layers only (tests compare layers)
VARIANTS = ("cuda", "cpu")
GPU_MODES = ("auto", "all", "none")
WORKSPACE = "/workspace"           # where the Dockerfile puts the project and where run mounts it
HF_CACHE = "/cache/huggingface"    # HF_HOME inside the image
# Passed through to the container by name (`-e NAME`), so values never appear on a command line.
# PIPELINE_BUILD_LOCK_HELD: `doit incontainer` already holds the build folder's lock on the host
# (tasks/workspace_lock.py); the doit inside the container must not wait for it.
PASSTHROUGH_ENV = ("HF_TOKEN", "HF_ENDPOINT", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES", ENV_BUILD_LOCK_HELD,
                   # `doit incontainer publish`: the registry and its credentials, by name only
                   "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def default_iidfile(target: str = "runtime", variant: str = "cuda") -> Path:
    return image_id_file(target, variant)


# -------------------------------------------------------------------------------------------------
# Docker client and daemon


def docker_cli() -> str:
    """The docker client: $PIPELINE_DOCKER, else Debian's /usr/bin/docker, else `docker` on PATH."""
    explicit = os.environ.get(ENV_DOCKER)
    if explicit:
        if not (shutil.which(explicit) or Path(explicit).is_file()):
            raise PipelineError(f"{ENV_DOCKER}={explicit} is not an executable docker client")
        return explicit
    if Path("/usr/bin/docker").is_file():
        return "/usr/bin/docker"
    found = shutil.which("docker")
    if not found:
        raise PipelineError("docker CLI not found: install Docker (Debian/Ubuntu: apt-get install docker.io) "
                            "or set PIPELINE_DOCKER=/path/to/docker")
    return found


def _daemon_address() -> str:
    return os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


def _explain(output: str, what: str) -> PipelineError | None:
    """Map the docker client's known failure messages to one-line errors; None when unknown."""
    text = output.lower()
    if "permission denied" in text and ("docker.sock" in text or "docker daemon socket" in text):
        return PipelineError(
            f"{what}: permission denied on the Docker socket ({_daemon_address()}): add your user to the "
            "`docker` group (sudo usermod -aG docker $USER, then log in again), use rootless Docker, "
            "or run as a user that may use the daemon")
    if ("cannot connect to the docker daemon" in text or "is the docker daemon running" in text
            or "error during connect" in text):
        return PipelineError(
            f"{what}: no Docker daemon reachable at {_daemon_address()}: start it (systemctl start docker, "
            "or dockerd), or point DOCKER_HOST at a running one")
    if "could not select device driver" in text or "nvidia-container-cli" in text or "unknown runtime" in text:
        return PipelineError(
            f"{what}: the NVIDIA container runtime is missing or broken on this Docker host: install the "
            "NVIDIA Container Toolkit, run `sudo nvidia-ctk runtime configure --runtime=docker` and restart "
            "Docker; or run on the CPU with --gpus none")
    if "network bridge not found" in text:
        return PipelineError(
            f"{what}: Docker's default bridge network is off on this host: set PIPELINE_DOCKER_NETWORK=host "
            "(build and run with host networking)")
    if "buildx component is missing" in text or "buildkit is enabled but the buildx" in text:
        return PipelineError(
            f"{what}: this docker client needs the buildx plugin for BuildKit builds: install it "
            "(docker-buildx-plugin) or use Debian's docker.io client (PIPELINE_DOCKER=/usr/bin/docker)")
    return None


def _capture(cmd: Sequence[str], what: str, timeout: float = 60) -> str:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise PipelineError(f"{what}: docker CLI {cmd[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise PipelineError(f"{what}: `{' '.join(cmd[:3])}` did not answer within {timeout:.0f} s "
                            f"(daemon at {_daemon_address()} hung?)") from None
    if done.returncode != 0:
        out = (done.stderr or "") + (done.stdout or "")
        raise _explain(out, what) or PipelineError(f"{what}: {_first_line(out) or f'exit {done.returncode}'}")
    return done.stdout


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def daemon_version(cli: str | None = None) -> str:
    """Server version; a clear PipelineError when the daemon is unreachable or the socket denied."""
    cli = cli or docker_cli()
    return _capture([cli, "version", "--format", "{{.Server.Version}}"], "docker").strip()


def nvidia_runtime(cli: str | None = None) -> bool:
    """True when the daemon can give containers GPUs: an `nvidia` runtime is registered (what
    `nvidia-ctk runtime configure` does), or the toolkit's prestart hook is on this (local) host."""
    cli = cli or docker_cli()
    runtimes = json.loads(_capture([cli, "info", "--format", "{{json .Runtimes}}"], "docker info") or "{}")
    if any("nvidia" in name for name in runtimes or {}):
        return True
    local = not os.environ.get("DOCKER_HOST", "unix://").startswith(("tcp://", "ssh://"))
    return local and shutil.which("nvidia-container-runtime-hook") is not None


def gpu_flags(gpus: str, cli: str | None = None) -> list[str]:
    if gpus not in GPU_MODES:
        raise PipelineError(f"gpus={gpus!r}: expected one of {', '.join(GPU_MODES)}")
    if gpus == "none":
        return []
    if nvidia_runtime(cli):
        return ["--gpus", "all"]
    if gpus == "all":
        raise PipelineError(
            "GPUs requested (--gpus all) but this Docker host has no NVIDIA runtime: install the NVIDIA "
            "Container Toolkit and run `sudo nvidia-ctk runtime configure --runtime=docker`, then restart "
            "Docker; or use --gpus auto/none to run on the CPU")
    return []


def _network_flags(network: str | None) -> list[str]:
    network = network if network is not None else os.environ.get(ENV_DOCKER_NETWORK, "")
    return ["--network", network] if network else []


def _stream(cmd: Sequence[str], what: str, env: dict[str, str] | None = None,
            log_file: str | os.PathLike | None = None) -> int:
    """Run cmd with its output shown live (and copied to log_file); on failure, explain known causes
    in one line."""
    tail: deque[str] = deque(maxlen=60)
    log = open(log_file, "w", encoding="utf-8") if log_file else None
    try:
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", bufsize=1, env=env)
    except FileNotFoundError:
        raise PipelineError(f"{what}: docker CLI {cmd[0]} not found") from None
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            sys.stdout.write(line)
            tail.append(line)
            if log:
                log.write(line)
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        raise
    finally:
        if log:
            log.close()
    if rc != 0:
        error = _explain("".join(tail), what)
        if error is not None:
            raise error
    return rc


# -------------------------------------------------------------------------------------------------
# Build


def _git(root: Path, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _public_url(url: str | None) -> str:
    """A remote URL without credentials (https://user:token@host/... would leak into a label)."""
    if not url:
        return "unknown"
    if "://" not in url:                      # scp-like git@host:owner/repo
        return url.split("@", 1)[-1]
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def provenance(root: Path, source_date_epoch: int | None = None, revision: str | None = None) -> dict[str, str]:
    """OCI label values: revision (git commit, `-dirty` with uncommitted changes to tracked files),
    source, SOURCE_DATE_EPOCH ($SOURCE_DATE_EPOCH, else the commit's time) and `created` from it."""
    if revision is None:
        revision = _git(root, "rev-parse", "HEAD") or "unknown"
        if revision != "unknown" and _git(root, "status", "--porcelain", "--untracked-files=no"):
            revision += "-dirty"
    if source_date_epoch is None:
        env = os.environ.get("SOURCE_DATE_EPOCH")
        commit_time = _git(root, "log", "-1", "--format=%ct")
        source_date_epoch = int(env) if env else int(commit_time) if commit_time else 0
    created = _dt.datetime.fromtimestamp(source_date_epoch, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"REVISION": revision, "SOURCE": _public_url(_git(root, "remote", "get-url", "origin")),
            "SOURCE_DATE_EPOCH": str(source_date_epoch), "CREATED": created}


def _check_ca(path: str | os.PathLike) -> Path:
    ca = Path(path).expanduser().resolve()
    if not ca.is_file():
        raise PipelineError(f"extra CA {ca}: no such file (PEM with the proxy's CA certificate)")
    if b"-----BEGIN CERTIFICATE-----" not in ca.read_bytes():
        raise PipelineError(f"extra CA {ca}: not a PEM certificate file (no BEGIN CERTIFICATE block)")
    return ca


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return                                  # unchanged: keep the mtime
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def build_image(root: str | os.PathLike, target: str = "runtime", base: str | None = None,
                variant: str = "cuda", extra_ca: str | os.PathLike | None = None,
                image_id_file: str | os.PathLike | None = None, *, tag: str | None = None,
                install_extra_ca: bool = False, network: str | None = None,
                revision: str | None = None, source_date_epoch: int | None = None,
                build_args: dict[str, str] | None = None, log_file: str | os.PathLike | None = None) -> str:
    """Build docker/Dockerfile's `target` with BuildKit; return the image id (sha256:...).

    base: BASE_IMAGE build argument (None: the Dockerfile's pinned CUDA default). variant: which lock.
    extra_ca: PEM file given to the build as BuildKit secret `extra_ca` (downloads only; baked into the
    image only with install_extra_ca). image_id_file: where the id is written atomically (relative
    paths start at root); it changes only when the image does. log_file: copy of the build log.
    """
    root = Path(root).resolve()
    if target not in TARGETS:
        raise PipelineError(f"target={target!r}: expected one of {', '.join(TARGETS)}")
    if variant not in VARIANTS:
        raise PipelineError(f"variant={variant!r}: expected one of {', '.join(VARIANTS)}")
    if not (root / DOCKERFILE).is_file():
        raise PipelineError(f"{root / DOCKERFILE} not found: is {root} the project root?")
    extra_ca = extra_ca if extra_ca is not None else os.environ.get(ENV_EXTRA_CA) or None
    if install_extra_ca and not extra_ca:
        raise PipelineError("install_extra_ca needs an extra CA file (--extra-ca FILE or PIPELINE_EXTRA_CA)")
    cli = docker_cli()
    daemon_version(cli)

    iid_tmp = root / IMAGE_FOLDER / f".iid.{os.getpid()}.tmp"
    iid_tmp.parent.mkdir(parents=True, exist_ok=True)
    args = {"VARIANT": variant, **provenance(root, source_date_epoch, revision), **(build_args or {})}
    if base:
        args["BASE_IMAGE"] = base
    if install_extra_ca:
        # BuildKit leaves secrets out of its cache key: the CA's digest (not secret) makes a changed CA
        # reinstall instead of reusing the layer made with the old one.
        args["INSTALL_EXTRA_CA"] = "true"
        args["EXTRA_CA_SHA256"] = hashlib.sha256(_check_ca(extra_ca).read_bytes()).hexdigest()
    cmd = [cli, "build", "--progress", "plain", "-f", str(root / DOCKERFILE), "--target", target,
           "--iidfile", str(iid_tmp), "-t", tag or f"{IMAGE_NAME}:{target}-{variant}"]
    for key, value in args.items():
        cmd += ["--build-arg", f"{key}={value}"]
    if extra_ca:
        cmd += ["--secret", f"id=extra_ca,src={_check_ca(extra_ca)}"]
    cmd += _network_flags(network)
    cmd.append(str(root))
    env = {**os.environ, "DOCKER_BUILDKIT": "1"}
    try:
        rc = _stream(cmd, "docker build", env=env, log_file=log_file)
        if rc != 0:
            raise PipelineError(f"docker build failed (exit {rc}); the build log above names the failing step")
        image_id = iid_tmp.read_text(encoding="utf-8").strip()
    finally:
        iid_tmp.unlink(missing_ok=True)
    if image_id_file is not None:
        path = Path(image_id_file)
        _write_atomic(path if path.is_absolute() else root / path, image_id + "\n")
    return image_id


# -------------------------------------------------------------------------------------------------
# Run


def read_image_id(image_id_file: str | os.PathLike) -> str:
    path = Path(image_id_file)
    if not path.is_file():
        raise PipelineError(f"{path} not found: build the image first (doit image, or python -m tasks.image build)")
    return path.read_text(encoding="utf-8").strip()


def host_hf_cache() -> Path:
    """The caller's Hugging Face cache ($HF_HOME, else ~/.cache/huggingface), created if missing so
    that a first run mounts a folder the caller owns instead of one Docker creates as root."""
    path = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface").expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _user_name() -> str:
    import getpass

    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = ""
    return "".join(c for c in name if c.isalnum() or c in "._-") or f"uid{os.getuid()}"


def run_command(root: str | os.PathLike, image_id: str, argv: Sequence[str], gpus: str = "auto", *,
                hf_cache: str | os.PathLike | None = None, network: str | None = None,
                user: str | None = None, env: dict[str, str] | None = None,
                cli: str | None = None) -> list[str]:
    """The `docker run` command line that run_in_image executes (see there)."""
    cli = cli or docker_cli()
    root = Path(root).resolve()
    cache = Path(hf_cache).resolve() if hf_cache is not None else host_hf_cache()
    cache.mkdir(parents=True, exist_ok=True)
    user = user or f"{os.getuid()}:{os.getgid()}"
    cmd = [cli, "run", "--rm", "--init",
           "--volume", f"{root}:{WORKSPACE}", "--workdir", WORKSPACE,
           "--volume", f"{cache}:{HF_CACHE}",
           "--user", user,
           # The caller's uid need not exist in the image's /etc/passwd: give it a writable HOME and a
           # user name (getpass.getuser(), used e.g. by torch for cache paths, reads $USER first).
           "--env", "HOME=/tmp", "--env", f"USER={_user_name()}", "--env", f"LOGNAME={_user_name()}"]
    for name in PASSTHROUGH_ENV:
        if name in os.environ:
            cmd += ["--env", name]             # by name: the value stays out of argv and `ps`
    # The image id travels in so that each stage built inside records it (tasks/provenance.py).
    for key, value in {ENV_IMAGE_ID: image_id, **(env or {})}.items():
        cmd += ["--env", f"{key}={value}"]
    cmd += _network_flags(network) + gpu_flags(gpus, cli)
    if sys.stdin.isatty() and sys.stdout.isatty():
        cmd.append("--tty")
    return cmd + [image_id, *argv]


def run_in_image(root: str | os.PathLike, image_id: str, argv: Sequence[str], gpus: str = "auto", *,
                 hf_cache: str | os.PathLike | None = None, network: str | None = None,
                 user: str | None = None, env: dict[str, str] | None = None) -> int:
    """Run argv in the image with the project (root) mounted at /workspace as the working directory,
    the HF cache at /cache/huggingface, as the caller's uid:gid (or `user`), and with `--gpus all` when
    gpus="all" (error without an NVIDIA runtime) or gpus="auto" and the host has one. Host networking
    (or any network) only when asked: network=... or PIPELINE_DOCKER_NETWORK. Returns the exit code."""
    cli = docker_cli()
    daemon_version(cli)
    if not image_id:
        raise PipelineError("no image id given: build the image first (doit image)")
    try:
        _capture([cli, "image", "inspect", "--format", "{{.Id}}", image_id], "docker image inspect")
    except PipelineError as exc:
        raise PipelineError(f"image {image_id} not found on this Docker host ({exc}): "
                            "build it first (doit image)") from None
    return _stream(run_command(root, image_id, argv, gpus, hf_cache=hf_cache, network=network,
                               user=user, env=env, cli=cli), "docker run")


# -------------------------------------------------------------------------------------------------
# Command line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.image", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build docker/Dockerfile and record the image id")
    b.add_argument("--root", default=".")
    b.add_argument("--target", choices=TARGETS[:2], default="runtime")
    b.add_argument("--variant", choices=VARIANTS, default=os.environ.get(ENV_IMAGE_VARIANT, "cuda"))
    b.add_argument("--base", default=os.environ.get(ENV_IMAGE_BASE) or None,
                   help="BASE_IMAGE build argument (default: the Dockerfile's pinned CUDA image)")
    b.add_argument("--extra-ca", default=None, help="PEM CA file for a TLS-intercepting proxy (default $PIPELINE_EXTRA_CA)")
    b.add_argument("--install-extra-ca", action="store_true", help="also install the extra CA into the image")
    b.add_argument("--iidfile", default=None, help="image id file (default build/image/TARGET-VARIANT.id)")
    b.add_argument("--tag", default=None)
    r = sub.add_parser("run", help="run a command in the image (project at /workspace, caller's uid)")
    r.add_argument("--root", default=".")
    src = r.add_mutually_exclusive_group()
    src.add_argument("--iidfile", default=None, help="image id file (default build/image/runtime-cuda.id)")
    src.add_argument("--image", default=None, help="image id or tag")
    r.add_argument("--gpus", choices=GPU_MODES, default="auto")
    r.add_argument("--hf-cache", default=None, help="host HF cache folder (default $HF_HOME or ~/.cache/huggingface)")
    r.add_argument("argv", nargs=argparse.REMAINDER, help="command, after --")
    c = sub.add_parser("check", help="is the Docker daemon usable (and the NVIDIA runtime, with --gpus all)?")
    c.add_argument("--gpus", choices=GPU_MODES, default="none")
    args = parser.parse_args(argv)

    try:
        if args.command == "build":
            iidfile = args.iidfile or default_iidfile(args.target, args.variant)
            image_id = build_image(args.root, args.target, args.base, args.variant, args.extra_ca, iidfile,
                                   tag=args.tag, install_extra_ca=args.install_extra_ca)
            print(f"image {image_id} ({args.target}, {args.variant}) -> {iidfile}")
            return 0
        if args.command == "run":
            command = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not command:
                parser.error("run: give the command after --, e.g. -- doit")
            image = args.image or read_image_id(Path(args.root) / (args.iidfile or default_iidfile()))
            return run_in_image(args.root, image, command, args.gpus, hf_cache=args.hf_cache)
        version = daemon_version()
        flags = gpu_flags(args.gpus)
        print(f"docker daemon {version} reachable; GPUs: {'yes' if flags else 'no'}")
        return 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

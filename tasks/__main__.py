"""Command line: ``python -m tasks stage NAME`` (what doit runs), ``check``, ``verify``, ``chat``,
``config``, ``publish``, ``versions``, ``fetch-package``."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Before torch loads OpenMP: with the default busy-waiting, two stages (or any other busy process)
# sharing a few cores slowed finetune ~30x on a 2-core machine; passive waiting costs almost nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from tasks.errors import PipelineError
from tasks.paths import FETCHED_FOLDER
from tasks.secrets import redact


def _redacted_traceback(kind, value, tb) -> None:
    """A bug still shows its traceback, with any credential in it (a URI, a header) masked."""
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))


sys.excepthook = _redacted_traceback


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("stage", "build one stage (doit calls this)"), ("check", "validate config and inputs"),
                            ("verify", "re-hash outputs against their manifests"),
                            ("publish", "register the finished package in the publish.registry"),
                            ("versions", "list the registered versions of publish.name"),
                            ("fetch-package", "download a registered version and verify it bit for bit"),
                            ("cache", "list the run cache, or `cache gc` to trim it to cache.max_size_gb"),
                            ("config", "show the effective configuration and where each value comes from"),
                            ("matrix-report", "compare the built [matrix] points (comparison.json/md/png)")):
        p = sub.add_parser(name, help=help_text)
        if name == "stage":
            p.add_argument("name")
        if name == "cache":
            p.add_argument("action", nargs="?", choices=("list", "gc"), default="list")
            p.add_argument("--max-size-gb", type=float, default=None, help="gc: trim to this size instead")
        if name == "fetch-package":
            p.add_argument("--version", default="latest", help="registered version (default: latest)")
            p.add_argument("--to", default=None, type=Path,
                           help="new folder for the verified package (default: fetched/NAME-VERSION)")
        p.add_argument("--config", default="pipeline.toml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. finetune.rank=16")
        p.add_argument("--root", default=".", help="project root that relative paths start from")
    p = sub.add_parser("chat", help="chat with a built package")
    p.add_argument("--package", default="build/tiny/package", type=Path)
    p.add_argument("--adapter", default=None, help="adapter name (default: the only one in the package)")
    p.add_argument("--no-adapter", action="store_true", help="use the base model only")
    p.add_argument("--prompt", default=None, help="answer this one prompt and exit")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--target", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)

    try:
        if args.command == "chat":
            from tasks.chat import chat, find_adapters, target_folder

            folder = target_folder(args.package, args.target)
            adapter = None if args.no_adapter else (args.adapter or next(iter(find_adapters(folder)), None))
            return chat(args.package, adapter, args.prompt, args.max_new_tokens, args.target)
        from tasks.config import load_config
        from tasks.paths import Paths

        root = Path(args.root)
        cfg = load_config(root / args.config, args.set)
        paths = Paths.of(root, cfg)
        if args.command in ("publish", "versions", "fetch-package"):
            from tasks import publish

            if args.command == "publish":
                return publish.main_publish(paths, cfg)
            if args.command == "versions":
                return publish.main_versions(cfg)
            dest = args.to or root / FETCHED_FOLDER / f"{cfg.publish.name.replace('/', '--')}-{args.version}"
            return publish.main_fetch(cfg, args.version, dest)
        if args.command == "matrix-report":
            from tasks.matrix import write_comparison

            out = write_comparison(paths.root, cfg.build.dir, cfg.matrix, cfg.export.targets[0])
            print((out / "comparison.md").read_text(encoding="utf-8"))
            print(f"matrix: comparison.json, comparison.md, comparison.png in {out}")
            return 0
        if args.command == "cache":
            from tasks.run_cache import main_cache

            return main_cache(paths, cfg, args.action, args.max_size_gb)
        if args.command == "verify":
            from tasks.stages import stages_for
            from tasks.verify import verify

            verify(paths, stages_for(cfg))
            return 0
        if args.command == "config":
            from tasks.config_doc import effective

            rows = effective(cfg, root / args.config, args.set)
            width = max(len(key) for key, _, _ in rows)
            for key, value, source in rows:
                shown = "unset" if value is None else json.dumps(value)
                print(f"{key:<{width}}  {shown}  ({source})")
            return 0
        if args.command == "check":
            from tasks.preflight import preflight

            preflight(cfg, paths)
            return 0
        if cfg.executor.kind == "ray":
            from tasks import ray_executor

            if not ray_executor.on_node():  # this process is doit's action: hand the stage to the cluster
                stage_argv = ["-m", "tasks", "stage", args.name, "--config", args.config, "--root", args.root]
                stage_argv += [a for kv in args.set for a in ("--set", kv)]
                ray_executor.dispatch(args.name, cfg, paths, stage_argv)
                return 0
        from tasks.runner import run_stage

        run_stage(args.name, cfg, paths)
        return 0
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("error: interrupted; the previous output of this stage is untouched", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

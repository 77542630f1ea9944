"""Stage 3, finetune: LoRA on the float twin of the AWQ checkpoint (peft), as in the lab.

Quantize first, then finetune: the adapter learns against the 4-bit weights and can recover part of
the quantization loss. Olive's LoRA pass would load the AWQ folder through transformers' AWQ
integration, which needs gptqmodel (CUDA 13 line only), so peft trains on the twin directly.

Records are rendered in the model's own chat template (or ``data.template``); the loss covers the
assistant turns only (every other token is masked), on a held-out split that evaluate and export
reuse. LoRA targets every linear of the decoder blocks unless ``finetune.target_modules`` names some
(tasks/families.py). Output: ``adapter/`` (peft format), ``heldout.jsonl``,
``metrics.json`` (train/eval loss curve).

Distributed (``finetune.processes`` > 1), at the end of this module: data-parallel LoRA training across ``finetune.processes`` processes with torch.distributed.

This process is rank 0 (it keeps the stage's logging, progress and output folder); ranks 1..N-1 are
spawned Python processes running the same loop (tasks.finetune.train) on their share of each global
batch. Backend: gloo on cpu, NCCL on cuda (rank r on GPU r).

Rendezvous: rank 0 opens the TCPStore on loopback port 0 (the kernel's choice, held from then on)
before the other ranks start and hands them its port, so no other process can take the port in
between. Shutdown: every rank meets at a barrier after training; ranks 1..N-1 then leave, and rank 0,
which hosts the store, tears its process group and the store down only after they have exited, so no
rank ever talks to a peer or a store that is already gone. Each spawned rank's stderr goes to a file
that lands in the stage log; a rank that fails is reported with its exit and its last stderr line.
If any rank dies, the others stop at the next collective (timeout) and the stage fails; the staging
folder is dropped and the previous finetune output stays published.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import multiprocessing
import os
import signal
import sys
import tempfile
from pathlib import Path

from tasks.awq_twin import load_float_twin
from tasks.config import DataSection, FinetuneSection
from tasks.data import Record, Render, assistant_spans, chat_renderer, check_special_tokens, load_dataset
from tasks.errors import PipelineError
from tasks.progress import step_progress
from tasks.workspace_lock import die_with_parent
from tasks import disk
from tasks.stage_spec import Stage, on_build_device

log = logging.getLogger(__name__)


def encode(tokenizer, render_chat: Render, record: Record, max_len: int, path="dataset") -> tuple[list[int], list[int]]:
    """Token ids of the rendered record and labels that keep the assistant turns only (the rest -100).
    The whole conversation is tokenized once; a token belongs to an answer if it starts inside one."""
    text, spans = assistant_spans(render_chat, record, path)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"][:max_len]
    labels = [tok if any(s <= start < e for s, e in spans) else -100
              for tok, (start, _) in zip(ids, encoded["offset_mapping"])]
    return ids, labels


def tokenizer_special_tokens(tokenizer) -> set[str]:
    """Every token the tokenizer matches in raw text as one id: its special and added tokens."""
    return set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int):
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (seq, lab) in enumerate(examples):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def mean_loss(model, examples, pad_id: int, device: str, batch_size: int) -> float:
    """Token-weighted mean cross-entropy over the response tokens of ``examples``."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate(examples[start:start + batch_size], pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(
                shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                ignore_index=-100, reduction="sum",
            )
            total += loss.item()
            count += int((shift_labels != -100).sum())
    return total / max(count, 1)


def _shard_loss(model, examples, rank: int, world: int, pad_id: int, device: str):
    """This rank's part of the global batch's mean response-token loss (the parts sum to it)."""
    import torch

    mine = examples[rank::world]
    batch = {k: v.to(device) for k, v in collate(mine, pad_id).items()}
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    shift_logits, shift_labels = logits[:, :-1], batch["labels"][:, 1:]
    summed = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]),
                                               shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
    return summed / max(_response_tokens(examples), 1)


def _normalise_adapter_config(path: Path) -> None:
    """peft stores target_modules as a set, so its JSON order follows string hashing, which changes
    from process to process: sort it so that the same training writes the same bytes."""
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


STAGE = Stage(
    "finetune", "LoRA trained against the 4-bit weights (float twin of the AWQ checkpoint)",
    upstream=("quantize",), keys=("data", "finetune", "build.device"), entry="tasks.finetune:run",
    files=lambda cfg: [cfg.data.path], gpu=on_build_device, disk=disk.need_finetune,
    processes=lambda cfg: cfg.finetune.processes,
)


def run(cfg, paths, out: Path, adapter: str | None = None) -> dict:
    """The stage's entry (STAGE above): the package's adapter on [data], or the extra adapter
    ``adapter`` on its own dataset ([adapters.<name>]), with the [finetune] settings."""
    from tasks.config import adapter_data

    data = adapter_data(cfg, adapter) if adapter else cfg.data
    return build(paths.stage("quantize"), data, cfg.finetune, paths.data(data.path), cfg.build.device, out)


def build(awq_dir: Path, data: DataSection, section: FinetuneSection, dataset: Path, device: str, out: Path) -> dict:
    if section.processes > 1:
        return train_distributed(awq_dir, data, section, dataset, device, out)
    return train(awq_dir, data, section, dataset, device, out)


def _response_tokens(examples) -> int:
    """Tokens the loss counts in a batch (labels after the one-token shift that are not masked)."""
    return sum(sum(1 for label in labels[1:] if label != -100) for _, labels in examples)


def train(awq_dir: Path, data: DataSection, section: FinetuneSection, dataset: Path, device: str,
          out: Path | None, rank: int = 0, world: int = 1) -> dict:
    """The LoRA training loop. With world > 1 (torch.distributed initialised by the caller) every rank
    takes its share of each global batch, the loss is the summed response-token loss over the global
    token count, and gradients are summed across ranks: the same objective as one process. Rank 0
    evaluates, logs and writes ``out``; the others pass out=None."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    from tasks.families import family_of
    from tasks.devices import select_device

    select_device(device)
    lead = rank == 0
    if world > 1 and device == "cuda":
        device = f"cuda:{rank}"
    train, held = load_dataset(dataset, data.template, data.eval_fraction, data.split_seed)
    log.info("dataset %s: %d train / %d held-out records", dataset, len(train), len(held))
    torch.manual_seed(section.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)

    tokenizer = AutoTokenizer.from_pretrained(awq_dir)
    # check saw the chat template's markers; this tokenizer may have more (e.g. a Hub model's </s>)
    check_special_tokens(dataset, train + held, data.template, tokenizer_special_tokens(tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    render_chat = chat_renderer(tokenizer, data.template, awq_dir)
    train_ex = [encode(tokenizer, render_chat, r, section.max_seq_len, dataset) for r in train]
    held_ex = [encode(tokenizer, render_chat, r, section.max_seq_len, dataset) for r in held]

    family = family_of(json.loads((awq_dir / "config.json").read_text(encoding="utf-8")), f"{awq_dir}/config.json")
    targets = family.target_modules(section.target_modules)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = load_float_twin(awq_dir, dtype, device)
    lora = LoraConfig(
        r=section.rank, lora_alpha=section.alpha, lora_dropout=section.dropout,
        target_modules=list(targets), bias="none", task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s (%s): %d trainable parameters", section.rank, section.alpha,
             ",".join(targets), family.label, trainable)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=section.learning_rate)
    warmup = max(1, section.max_steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    order = torch.Generator().manual_seed(section.seed)
    history: dict[str, list] = {"train": [], "eval": []}

    model.eval()
    eval_loss = mean_loss(model, held_ex, pad_id, device, section.batch_size) if lead else float("nan")
    history["eval"].append([0, round(eval_loss, 6)])
    if lead:
        log.info("step 0: held-out loss %.4f%s", eval_loss, f" ({world} processes)" if world > 1 else "")
    trainable_params = [p for p in model.parameters() if p.requires_grad]
    perm: list[int] = []
    with step_progress("finetune", section.max_steps) if lead else contextlib.nullcontext(lambda _: None) as advance:
        for step in range(1, section.max_steps + 1):
            model.train()
            if len(perm) < section.batch_size:
                perm += torch.randperm(len(train_ex), generator=order).tolist()
            picked, perm = perm[: section.batch_size], perm[section.batch_size:]
            if world == 1:
                batch = {k: v.to(device) for k, v in collate([train_ex[i] for i in picked], pad_id).items()}
                loss = model(**batch).loss
            else:
                loss = _shard_loss(model, [train_ex[i] for i in picked], rank, world, pad_id, device)
            loss.backward()
            if world > 1:
                import torch.distributed as dist

                for param in trainable_params:
                    dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
                loss = loss.detach().clone()
                dist.all_reduce(loss, op=dist.ReduceOp.SUM)  # the global batch's mean loss, for the log
            if not math.isfinite(loss.item()):
                raise RuntimeError(f"training loss became {loss.item()} at step {step}; lower finetune.learning_rate")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            history["train"].append([step, round(loss.item(), 6)])
            if lead and (step % section.eval_every == 0 or step == section.max_steps):
                model.eval()
                eval_loss = mean_loss(model, held_ex, pad_id, device, section.batch_size)
                history["eval"].append([step, round(eval_loss, 6)])
                log.info("step %d: train loss %.4f, held-out loss %.4f", step, loss.item(), eval_loss)
            advance(f"loss {loss.item():.3f}")
    if not lead or out is None:
        return {}

    # save_embedding_layers=False: "auto" makes peft look the base model up on the Hub (a network
    # call from an offline build) only to learn whether embeddings changed; LoRA never touches them.
    model.save_pretrained(out / "adapter", safe_serialization=True, save_embedding_layers=False)
    _normalise_adapter_config(out / "adapter" / "adapter_config.json")
    with open(out / "heldout.jsonl", "w", encoding="utf-8") as fh:
        for r in held:
            fh.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    metrics = {
        "train_records": len(train), "heldout_records": len(held), "trainable_parameters": trainable,
        "template": data.template, "chat_template": None if data.template else tokenizer.chat_template,
        "target_modules": list(targets), "loss": history,
        "heldout_loss_before": history["eval"][0][1], "heldout_loss_after": history["eval"][-1][1],
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return {"heldout_loss_before": metrics["heldout_loss_before"], "heldout_loss_after": metrics["heldout_loss_after"],
            "target_modules": list(targets)}


# --- data-parallel training across finetune.processes processes ----------------------------------

# The other ranks' stderr: a logger outside "tasks", so that it reaches the stage log file but not the terminal.
rank_log = logging.getLogger("finetune.ranks")
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
JOIN_TIMEOUT_S = 300  # for the other ranks to leave after the final barrier (tear-down and exit only)


def _process_group(rank: int, world: int, store, device: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=store, rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)


def _worker(rank: int, world: int, port: int, stderr_path: str, args: tuple, parent_pid: int) -> None:
    die_with_parent(parent_pid)  # a rank never outlives its stage process (and the build lock it holds)
    # Everything this rank writes to fd 2 (Python's and native code's, e.g. c10d or gloo before an
    # abort) goes to its own file, which rank 0 copies into the stage log.
    fd = os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import torch.distributed as dist


    awq_dir, data, section, dataset, device = args
    store = dist.TCPStore("127.0.0.1", port, world, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    _process_group(rank, world, store, device)
    train(awq_dir, data, section, dataset, device, None, rank, world)
    _barrier(rank, device)  # rank 0 has written its output: the job is done for every rank
    dist.destroy_process_group()
    sys.stderr.flush()


def _barrier(rank: int, device: str) -> None:
    import torch.distributed as dist

    dist.barrier(device_ids=[rank]) if device == "cuda" else dist.barrier()


def _exit_words(code: int | None) -> str:
    if code is None:
        return f"did not exit within {JOIN_TIMEOUT_S} s of the end of training"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


def _rank_failed(rank: int, world: int, code: int | None, stderr_path: Path) -> PipelineError:
    text = stderr_path.read_text(encoding="utf-8", errors="replace") if stderr_path.is_file() else ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "(nothing on stderr)"
    return PipelineError(f"finetune rank {rank} of {world} {_exit_words(code)} (its last stderr line: {last}); "
                         "its whole stderr is in the stage log; or set finetune.processes = 1")


def train_distributed(awq_dir: Path, data: DataSection, section: FinetuneSection, dataset: Path, device: str,
                      out: Path) -> dict:
    import torch
    import torch.distributed as dist


    world = section.processes
    if device == "cuda" and torch.cuda.device_count() < world:
        raise PipelineError(f"finetune.processes = {world} needs {world} GPUs on this host, torch sees "
                            f"{torch.cuda.device_count()}; lower finetune.processes")
    # Each process gets an equal share of the cores (torch would otherwise start one thread per core in each).
    threads = max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    # The store's server lives in this process from here until every other rank has exited.
    store = dist.TCPStore("127.0.0.1", 0, world, is_master=True, timeout=COLLECTIVE_TIMEOUT, wait_for_workers=False)
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as tmp:
        stderr_paths = {rank: Path(tmp) / f"rank{rank}.stderr" for rank in range(1, world)}
        ctx = multiprocessing.get_context("spawn")
        workers = {rank: ctx.Process(target=_worker, args=(rank, world, store.port, str(stderr_paths[rank]),
                                                           (awq_dir, data, section, dataset, device), os.getpid()),
                                       daemon=True)
                   for rank in range(1, world)}
        previous_threads = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(threads)  # inherited by the spawned ranks
        try:
            for worker in workers.values():
                worker.start()
        finally:
            if previous_threads is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = previous_threads
        log.info("finetune: %d processes (torch.distributed, %s), %d thread(s) each", world,
                 "nccl" if device == "cuda" else "gloo", threads)
        try:
            _process_group(0, world, store, device)
            try:
                facts = train(awq_dir, data, section, dataset, device, out, 0, world)
                _barrier(0, device)
                for worker in workers.values():
                    worker.join(timeout=JOIN_TIMEOUT_S)
            finally:
                dist.destroy_process_group()
        except BaseException as exc:
            dead = {rank: w.exitcode for rank, w in workers.items() if not w.is_alive() and w.exitcode}
            for worker in workers.values():
                if worker.is_alive():
                    worker.kill()
                worker.join()
            _log_rank_stderr(stderr_paths)
            if dead and isinstance(exc, Exception):  # rank 0 failed because another rank died first
                rank, code = min(dead.items())
                raise _rank_failed(rank, world, code, stderr_paths[rank]) from exc
            raise
        _log_rank_stderr(stderr_paths)
        for rank, worker in workers.items():
            code = worker.exitcode
            if code != 0:
                if code is None:
                    worker.kill()
                    worker.join()
                raise _rank_failed(rank, world, code, stderr_paths[rank])
    return {**facts, "processes": world}


def _log_rank_stderr(paths: dict[int, Path]) -> None:
    for rank, path in paths.items():
        text = path.read_text(encoding="utf-8", errors="replace").rstrip() if path.is_file() else ""
        if text:
            rank_log.info("finetune rank %d stderr:\n%s", rank, text)

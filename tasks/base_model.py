"""Stage 1, base model: build a random-init Phi-3 locally (tiny, or a real model's exact shape for
benchmarks), or fetch a Hub model at a pinned commit.

Output folder: a Hugging Face model folder (config.json, generation_config.json, safetensors
weights, tokenizer files with the chat template) that the quantize stage reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path

from tasks.config import ModelSection, TinyModel
from tasks.errors import PipelineError
from tasks.families import FAMILIES, Family
from tasks.manifest import clone_file
from tasks.model_files import model_files, patterns as model_patterns
from tasks import disk
from tasks.stage_spec import Stage

log = logging.getLogger(__name__)



def base_files(cfg) -> list[str]:
    """The stage's input files: the tokenizer corpus of a locally built model, or every file of a local
    model folder (a Hub model is pinned by its commit instead)."""
    if cfg.model.hub_source:
        return []
    if cfg.model.profile != "local":
        return [cfg.model.tiny.tokenizer_corpus]
    folder = Path(cfg.model.path)
    return [str(folder / p.relative_to(folder)) for p in model_files(folder, cfg.model.trust_remote_code)]


def disk_need(cfg, paths) -> int | None:
    if cfg.model.profile == "local":
        return sum(paths.data(f).stat().st_size for f in base_files(cfg)) + disk.SLACK
    # A Hub model goes to the HF cache and is copied; its size is known only to the Hub.
    return None if cfg.model.hub_source else disk.random_model_bytes(cfg) + disk.SLACK


STAGE = Stage(
    "base", "base model: random-init model built locally (tiny or a real shape), a Hub model at a pinned commit, "
    "or a local model folder",
    upstream=(), keys=("model",), entry="tasks.base_model:run", files=base_files, disk=disk_need,
)


def run(cfg, paths, out: Path) -> dict:
    """The stage's entry (STAGE above): config and paths onto ``build``."""
    return build(cfg.model, paths.root, out)


def build(model: ModelSection, root: Path, out: Path) -> dict:
    """Write the base model into ``out``; return facts for the manifest."""
    if model.hub_source:
        repo_id, revision = model.hub_source
        facts = fetch_hub_model(repo_id, revision, out, model.trust_remote_code, model.allow_floating_revision)
    elif model.profile == "local":
        facts = copy_local_model((root / model.path).resolve(), out, model.trust_remote_code)
    else:
        return {**build_tiny_model(model.random_spec, root, out), "profile": model.profile}
    return {**facts, "family": json.loads((out / "config.json").read_text(encoding="utf-8")).get("model_type")}


# --- tiny -----------------------------------------------------------------------------------------

def _rope_factors(n: int, top: float) -> list[float]:
    """Monotone per-frequency factors from 1.0 to ``top``, the shape of Phi-3.5's longrope lists."""
    return [round(1.0 + (top - 1.0) * (i / (n - 1)) ** 3, 6) for i in range(n)]


def tiny_config_fields(tiny: TinyModel, special_ids: dict[str, int]) -> dict:
    """Phi-3.5-mini-instruct's config.json with only the sizes (and token ids) changed."""
    head_dim = tiny.hidden_size // tiny.num_attention_heads
    return dict(
        architectures=["Phi3ForCausalLM"],
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=special_ids["<|endoftext|>"],
        embd_pdrop=0.0,
        eos_token_id=special_ids["<|endoftext|>"],
        hidden_act="silu",
        hidden_size=tiny.hidden_size,
        initializer_range=0.02,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=131072,
        model_type="phi3",
        num_attention_heads=tiny.num_attention_heads,
        num_hidden_layers=tiny.num_hidden_layers,
        num_key_value_heads=tiny.num_key_value_heads or tiny.num_attention_heads,
        original_max_position_embeddings=4096,
        pad_token_id=special_ids["<|endoftext|>"],
        resid_pdrop=0.0,
        rms_norm_eps=1e-05,
        rope_scaling={
            "type": "longrope",
            "short_factor": _rope_factors(head_dim // 2, 1.1),
            "long_factor": _rope_factors(head_dim // 2, 60.0),
        },
        rope_theta=10000.0,
        sliding_window=262144,
        tie_word_embeddings=False,
        use_cache=True,
        vocab_size=tiny.vocab_size,
    )


def family_config_fields(family: Family, tiny: TinyModel, special_ids: dict[str, int]) -> dict:
    """A config.json of ``family`` with its real structural options (rope scaling, tied embeddings,
    soft-capping, q/k norms...) and the sizes of ``tiny``."""
    if family.model_type == "phi3":
        return tiny_config_fields(tiny, special_ids)
    kv_heads = tiny.num_key_value_heads or (tiny.num_attention_heads // 2 if family.gqa else tiny.num_attention_heads)
    fields = dict(
        model_type=family.model_type, hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_hidden_layers, num_attention_heads=tiny.num_attention_heads,
        num_key_value_heads=max(1, kv_heads), vocab_size=tiny.vocab_size, rms_norm_eps=1e-06,
        eos_token_id=[special_ids[t] for t in family.end_of_turn], pad_token_id=special_ids[family.pad],
        bos_token_id=special_ids[family.bos] if family.bos else None, **family.structure,
    )
    if tiny.head_dim:
        fields["head_dim"] = tiny.head_dim
        if "query_pre_attn_scalar" in fields:
            fields["query_pre_attn_scalar"] = tiny.head_dim
    return fields


def train_tokenizer(corpus: Path, vocab_size: int, family: Family = FAMILIES["phi3"]):
    """Byte-level BPE on the fixed corpus, wrapped as a transformers fast tokenizer."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")  # one thread: merge order must not depend on scheduling
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not corpus.is_file():
        raise PipelineError(f"tokenizer corpus {corpus} not found; restore it from git or set model.tiny.tokenizer_corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(family.special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus.read_text(encoding="utf-8").splitlines()
    tok.train_from_iterator(lines, trainer=trainer, length=len(lines))
    named = {family.bos, family.eos, family.pad}
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        additional_special_tokens=[t for t in family.special_tokens if t not in named],
        chat_template=family.chat_template,
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(tiny: TinyModel, root: Path, out: Path) -> dict:
    import torch
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM, GenerationConfig

    family = FAMILIES[tiny.family]
    log.info("training byte-level BPE tokenizer (vocab %d) on %s", tiny.vocab_size, tiny.tokenizer_corpus)
    tokenizer = train_tokenizer(root / tiny.tokenizer_corpus, tiny.vocab_size, family)
    special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in family.special_tokens}
    config = CONFIG_MAPPING[family.model_type](**family_config_fields(family, tiny, special_ids))
    config.vocab_size = max(tiny.vocab_size, len(tokenizer))

    log.info("initialising a random-init %s model (%d layers, hidden %d), seed %d",
             family.label, tiny.num_hidden_layers, tiny.hidden_size, tiny.seed)
    torch.manual_seed(tiny.seed)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)  # the families ship bf16 weights
    bos = special_ids[family.bos] if family.bos else None
    model.generation_config = GenerationConfig(
        bos_token_id=bos, eos_token_id=[special_ids[t] for t in family.end_of_turn], pad_token_id=special_ids[family.pad],
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("random-init model: %d parameters, vocab %d", n_params, config.vocab_size)
    return {"source": "tiny", "family": family.model_type, "parameters": n_params}


# --- hub ------------------------------------------------------------------------------------------



def check_remote_code(snapshot: Path, repo_id: str, trust_remote_code: bool) -> str:
    """Refuse a model that needs its own Python code unless allowed; say what will run."""
    from transformers import CONFIG_MAPPING

    config = json.loads((snapshot / "config.json").read_text(encoding="utf-8")) if (snapshot / "config.json").is_file() else {}
    auto_map, model_type = config.get("auto_map"), config.get("model_type")
    if not auto_map:
        return "none"
    if model_type in CONFIG_MAPPING and not trust_remote_code:
        log.info("%s ships its own code (auto_map) but transformers implements %r: the repo's code is not "
                 "downloaded or run", repo_id, model_type)
        return "ignored (transformers implements the model)"
    if not trust_remote_code:
        raise PipelineError(
            f"{repo_id} needs its own Python code (config.json auto_map; model_type {model_type!r} is unknown to "
            "transformers); review the repo's *.py files at this commit, then set model.trust_remote_code = true"
        )
    log.warning("model.trust_remote_code is on: %s's Python code will run in the quantize and later stages", repo_id)
    return "allowed"


def copy_local_model(folder: Path, out: Path, trust_remote_code: bool = False) -> dict:
    """A model folder on this machine, cloned into ``out`` with the same filter as a Hub download."""
    if not (folder / "config.json").is_file():
        raise PipelineError(f"model.path {folder} has no config.json; point it at a Hugging Face model folder")
    files = model_files(folder, trust_remote_code)
    if not any(p.suffix == ".safetensors" for p in files):
        raise PipelineError(f"model.path {folder} has no safetensors weights; pickled weights are refused "
                            "(convert them with transformers' save_pretrained(safe_serialization=True))")
    remote_code = check_remote_code(folder, str(folder), trust_remote_code)
    for path in files:
        clone_file(path.resolve(), out / path.relative_to(folder))
    log.info("copied %d files from %s", len(files), folder)
    return {"source": "local", "path": str(folder), "remote_code": remote_code}


@contextlib.contextmanager
def hub_errors(repo_id: str, revision: str):
    """The Hub's errors for ``repo_id`` at ``revision`` as one line that says what to do (the base stage's
    download and check's read of config.json go through this)."""
    from huggingface_hub.errors import (
        GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise PipelineError(
            f"{repo_id} is gated; accept its license on huggingface.co and export HF_TOKEN with read access"
        ) from None
    except RevisionNotFoundError:
        raise PipelineError(f"{repo_id} has no commit {revision}; pin a commit from the model's history") from None
    except RepositoryNotFoundError:
        raise PipelineError(
            f"{repo_id} not found on the Hub (or private); check model.repo_id, or export HF_TOKEN if it is private"
        ) from None
    except LocalEntryNotFoundError:
        raise PipelineError(
            f"{repo_id}@{revision[:12]} is not in the local HF cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE set or no network); run once with network access or point HF_HOME at a cache that has it"
        ) from None


def fetch_hub_model(repo_id: str, revision: str, out: Path, trust_remote_code: bool = False,
                    allow_floating_revision: bool = False) -> dict:
    """snapshot_download at a commit into the standard HF cache (HF_HOME, HF_HUB_OFFLINE and
    HF_TOKEN from the environment), then link the files into ``out``."""
    from huggingface_hub import snapshot_download

    log.info("fetching %s at %s (cache: HF_HOME=%s, offline=%s)", repo_id, revision,
             os.environ.get("HF_HOME", "~/.cache/huggingface"), os.environ.get("HF_HUB_OFFLINE", "0"))
    with hub_errors(repo_id, revision):
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=model_patterns(trust_remote_code)))
    commit = snapshot.name  # snapshots/<commit>: what a branch or tag resolved to
    if commit != revision:
        log.warning("floating revision %r resolved to commit %s; pin that commit to make this build repeatable",
                    revision, commit)
    # Offline, snapshot_download returns the cached snapshot as it is (it cannot apply allow_patterns
    # without the Hub's file list), so the same filter is applied here: no code unless allowed, no pickles.
    files = model_files(snapshot, trust_remote_code)
    if not any(p.suffix == ".safetensors" for p in files):
        raise PipelineError(f"{repo_id}@{revision[:12]} has no safetensors weights; pickled weights are refused")
    remote_code = check_remote_code(snapshot, repo_id, trust_remote_code)
    for path in files:
        clone_file(path.resolve(), out / path.relative_to(snapshot))
    log.info("linked %d files from %s", len(files), snapshot)
    return {"source": "hub", "repo_id": repo_id, "revision": revision, "commit": commit, "remote_code": remote_code}

"""The one typed, validated build configuration (``pipeline.toml``).

Each stage reads only its own section; ``dodo.py`` hashes exactly those sections so that a change
to one section reruns only the stages that read it. Unknown keys are errors (``extra="forbid"``),
so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      field_validator, model_validator)

from tasks.data import template_parts
from tasks.errors import PipelineError

COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

# The Phi-3.5 chat format as a text template, exactly as the Olive lab writes it (data.template).
LAB_TEMPLATE = "<|user|>\n{prompt}<|end|>\n<|assistant|>\n{response}<|end|>"

# Named Hub models. A profile pins a full commit, never a branch: the same config must mean the
# same bytes next year. Bump by replacing the hash with a newer commit from the model's history.
HUB_PROFILES: dict[str, dict[str, str]] = {
    "phi-3.5-mini": {
        "repo_id": "microsoft/Phi-3.5-mini-instruct",
        "revision": "2fe192450127e6a83f7441aef6e3ca586c338b77",
    },
}
# Random-init models with a real model's exact sizes, built locally (no download): for benchmarks
# of speed and memory, where the weights' values do not matter. Every other config field is the
# family's, as in the tiny profile (tasks/families.py).
SHAPE_PROFILES: dict[str, dict[str, Any]] = {
    "phi-3.5-mini-shape": {
        "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
        "num_attention_heads": 32, "vocab_size": 32064,
    },
    # Qwen/Qwen2.5-0.5B-Instruct's config.json: about 0.5B parameters, the on-device size.
    "qwen2.5-0.5b-shape": {
        "family": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
    },
    # Qwen/Qwen2.5-3B-Instruct's config.json: GQA with 2 KV heads, qkv biases, tied embeddings.
    "qwen2.5-3b-shape": {
        "family": "qwen2", "hidden_size": 2048, "intermediate_size": 11008, "num_hidden_layers": 36,
        "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 151936,
    },
}
PROFILES = ("tiny", "hub", "local", *HUB_PROFILES, *SHAPE_PROFILES)


def _shown(value: Any) -> str:
    """A value as it was written in TOML: true, "16", 1e+23, an array."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return json.dumps(value)[:40]
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        return str(value) if value.bit_length() < 64 else "a huge integer"
    return {dict: "a table", list: "an array"}.get(type(value), f"a {type(value).__name__}")


def _integer(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"must be an integer, not {_shown(value)}")
    return value


def _finite(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be a number, not {_shown(value)}")
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer past the float range
        finite = False
    if not finite:
        raise ValueError(f"must be a finite number, not {_shown(value)}")
    return value


def at_most(limit: float, why: str) -> AfterValidator:
    """An upper bound whose error says why: past it a size is a typo that would run for days, or fail
    only after every stage before it ran."""
    def check(value):
        if value > limit:
            raise ValueError(f"must be at most {limit:,}; {why}")
        return value

    return AfterValidator(check)


# Strict numbers: a boolean is not an integer, a float (1e23) is not one either; a float field takes
# an integer but never inf or nan. (Pydantic's lax mode would read true as 1.)
Int = Annotated[int, BeforeValidator(_integer)]
Float = Annotated[float, BeforeValidator(_finite)]
OptionalFloat = Annotated[float | None, BeforeValidator(lambda v: v if v is None else _finite(v))]
Seed = Annotated[Int, Field(ge=0), at_most(2**32 - 1, "seeds are 32-bit")]
MAX_CONTEXT = 131072
CONTEXT_WHY = f"Phi-3.5's context is {MAX_CONTEXT:,} positions"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class BuildSection(Section):
    dir: str = "build/tiny"
    """Folder that receives every stage's output (relative to the project folder, or absolute). The build
    owns it: a new or empty folder is marked as a build folder; one holding other files, a system or
    home folder and the project folder or one above it are refused (tasks/ownership.py)."""
    device: Literal["cpu", "cuda"] = "cpu"
    """Where quantize and finetune compute. The tiny profile is meant for cpu."""
    gpu_slots: Int = Field(1, ge=1, le=16)
    """How many stages may compute on the GPU at once across all builds on this machine (tasks/gpu_slots.py)."""


class TinyModel(Section):
    """A random-init model of one family, built locally: Phi-3 (the default) mirrors Phi-3.5-mini-instruct
    in every config field but sizes; the other families get their real structural options
    (tasks/families.py)."""

    family: str = "phi3"
    """config.json model_type of the family: phi3, llama, mistral, qwen2, qwen3 or gemma2."""
    hidden_size: Annotated[Int, at_most(16384, "that is over 3x Phi-3-medium's 5120")] = Field(256, ge=64)
    """Hidden size (width) of the locally built model."""
    intermediate_size: Annotated[Int, at_most(65536, "that is over 3x Phi-3-medium's 17920")] = Field(512, ge=64)
    """Width of the MLP."""
    num_hidden_layers: Int = Field(2, ge=1, le=64)
    """Decoder layers."""
    num_attention_heads: Annotated[Int, at_most(256, "the supported families have at most 64")] = Field(4, ge=1)
    """Attention heads."""
    num_key_value_heads: Int | None = Field(None, ge=1, le=256)
    """None: one per attention head for Phi-3, half as many (grouped-query attention) for the others."""
    head_dim: Int | None = Field(None, ge=8, le=512)
    """None: hidden_size / num_attention_heads, or the family's own (Qwen3 and Gemma 2 set it apart)."""
    vocab_size: Int = Field(2000, ge=300, le=262144)
    """Vocabulary of the BPE tokenizer trained on tokenizer_corpus (the model's rows: at least that)."""
    seed: Seed = 0
    """Seed of the random init."""
    tokenizer_corpus: str = "data/tokenizer_corpus.txt"
    """Text the tokenizer is trained on (relative to the project folder)."""

    @field_validator("family")
    @classmethod
    def _known_family(cls, value: str) -> str:
        from tasks.families import FAMILIES, SUPPORTED

        if value not in FAMILIES:
            raise ValueError(f"unknown family {value!r}; one of: {SUPPORTED}")
        return value

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "TinyModel":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if (self.head_dim or self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("head size (hidden_size / num_attention_heads, or head_dim) must be even for RoPE")
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self


class ModelSection(Section):
    profile: str = "tiny"
    """tiny (built locally, offline; any family via model.tiny.family), phi-3.5-mini (pinned Hub commit), hub
    (repo_id + revision, any supported family), local (a model folder on this machine: model.path) or a
    shape profile (random weights with a real model's exact sizes, for benchmarks): phi-3.5-mini-shape,
    qwen2.5-3b-shape."""
    repo_id: str | None = None
    """Profile hub: the model's repository, e.g. Qwen/Qwen2.5-0.5B-Instruct."""
    revision: str | None = None
    """Profile hub: a 40-hex commit of that repository (a branch or tag only with allow_floating_revision)."""
    path: str | None = None
    """Profile local: a Hugging Face model folder (config.json, *.safetensors, tokenizer files), relative to
    the project folder or absolute. Its files are inputs of the build: editing one rebuilds from base."""
    trust_remote_code: bool = False
    """Allow this Hub model's own Python code (config.json auto_map) to be downloaded and run."""
    allow_floating_revision: bool = False
    """Accept a branch or tag as model.revision (resolved to a commit and recorded); off: commits only."""
    tiny: TinyModel = TinyModel()

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, value: str) -> str:
        if value not in PROFILES:
            raise ValueError(f"unknown profile {value!r}; choose one of: {', '.join(PROFILES)}")
        return value

    @model_validator(mode="after")
    def _hub_fields(self) -> "ModelSection":
        if self.profile == "hub" and not (self.repo_id and self.revision):
            raise ValueError("profile 'hub' needs model.repo_id and model.revision")
        if self.profile != "hub" and (self.repo_id or self.revision):
            raise ValueError(f"model.repo_id/revision are only used with profile 'hub', not {self.profile!r}")
        if self.hub_source and not COMMIT_RE.match(self.hub_source[1]) and not self.allow_floating_revision:
            raise ValueError(
                f"revision {self.hub_source[1]!r} is not a 40-hex commit; pin the full commit hash "
                "shown in the model's history on the Hub (or set model.allow_floating_revision = true to "
                "accept a moving branch or tag, knowing the build can change under you)"
            )
        if (self.profile == "local") != bool(self.path):
            raise ValueError("profile 'local' needs model.path (a model folder), and model.path needs profile 'local'")
        if not self.hub_source and self.allow_floating_revision:
            raise ValueError("allow_floating_revision applies to Hub models only, "
                             f"not to profile {self.profile!r}")
        if not self.hub_source and self.profile != "local" and self.trust_remote_code:
            raise ValueError("trust_remote_code and allow_floating_revision apply to Hub models only, "
                             f"not to profile {self.profile!r}")
        return self

    @property
    def random_spec(self) -> TinyModel | None:
        """Sizes of a locally built random-init model (tiny or a shape profile); None for Hub models."""
        if self.profile in SHAPE_PROFILES:
            return TinyModel(**SHAPE_PROFILES[self.profile], seed=self.tiny.seed,
                             tokenizer_corpus=self.tiny.tokenizer_corpus)
        return None if self.hub_source or self.profile == "local" else self.tiny

    @property
    def hub_source(self) -> tuple[str, str] | None:
        """(repo_id, revision) for Hub profiles, None for tiny."""
        if self.profile in HUB_PROFILES:
            p = HUB_PROFILES[self.profile]
            return p["repo_id"], p["revision"]
        if self.profile == "hub":
            return self.repo_id or "", self.revision or ""
        return None


class DataSection(Section):
    path: str = "data/travel_qa.jsonl"
    """JSON-lines dataset: {"prompt", "response"} or {"messages": [{"role", "content"}, ...]} per line."""
    template: str | None = None
    """None (the default): the model's own chat template renders every record. Or a text template for
    prompt/response records: {prompt} and then {response}, each once; {{ and }} are literal braces (tasks/data.py)."""
    eval_fraction: Float = Field(0.1, gt=0, lt=0.5)
    """Share of the records held out from training (evaluated by finetune, export and evaluate)."""
    split_seed: Seed = 0
    """Seed of the held-out split."""

    @field_validator("template")
    @classmethod
    def _template_syntax(cls, value: str | None) -> str | None:
        if value is not None:
            template_parts(value)  # ValueError naming the stray brace or field
        return value


class QuantizeSection(Section):
    bits: Literal[4] = 4
    """Weight bits (AWQ int4)."""
    group_size: Literal[32, 64, 128] = 128
    """Weights that share one scale and zero point (32, 64 or 128)."""
    zero_point: bool = True
    """Asymmetric quantization with a zero point per group."""
    version: Literal["gemm"] = "gemm"
    """AutoAWQ's packing layout."""
    calibration: str = "data/calibration.txt"
    """Local calibration text, one paragraph per line (relative to the project folder)."""
    calibration_samples: Annotated[Int, at_most(4096, "AutoAWQ uses 128, and every sample's activations are kept "
                                                "for each layer's search")] = Field(128, ge=1)
    """AutoAWQ's max_calib_samples: calibration texts used."""
    calibration_seq_len: Annotated[Int, at_most(MAX_CONTEXT, CONTEXT_WHY)] = Field(256, ge=16)
    """AutoAWQ's max_calib_seq_len: tokens per calibration block (longer texts are dropped)."""
    search: Literal["fast", "autoawq"] = "fast"
    """Scale and clip search: "fast" (batched on the device, same choices as AutoAWQ's; see
    tasks/awq_search.py) or "autoawq" (AutoAWQ's own loops, with the CPU fix)."""


class FinetuneSection(Section):
    rank: Int = Field(8, ge=1, le=256)
    """LoRA rank."""
    alpha: Float = Field(16.0, gt=0)
    """LoRA alpha (the adapter's output is scaled by alpha / rank)."""
    dropout: Float = Field(0.05, ge=0, lt=1)
    """LoRA dropout while training."""
    target_modules: tuple[str, ...] = ("all-linear",)
    """Decoder-block linears LoRA trains: "all-linear" (every one, PEFT's convention) or the family's names,
    e.g. ["q_proj", "v_proj"] for Llama, ["qkv_proj", "o_proj"] for Phi-3 (checked against the model at check)."""
    max_steps: Annotated[Int, at_most(1_000_000, "a million optimizer steps is days of training")] = Field(100, ge=1)
    """Optimizer steps."""
    learning_rate: Annotated[Float, at_most(1.0, "training diverges far below that; LoRA uses about 1e-4 to 1e-2")] = \
        Field(0.002, gt=0)
    """AdamW learning rate (linear warm-up over the first tenth of the steps)."""
    batch_size: Annotated[Int, at_most(4096, "every step holds the whole batch's activations in memory")] = \
        Field(8, ge=1)
    """Records per optimizer step (the global batch, whatever finetune.processes is)."""
    max_seq_len: Annotated[Int, at_most(MAX_CONTEXT, CONTEXT_WHY)] = Field(256, ge=16)
    """Tokens per record; longer records are cut."""
    seed: Seed = 0
    """Seed of the LoRA init and the batch order."""
    eval_every: Annotated[Int, at_most(1_000_000, "finetune.max_steps can be at most that")] = Field(25, ge=1)
    """Steps between held-out loss evaluations."""
    processes: Int = Field(1, ge=1, le=64)
    """Data-parallel training processes (torch.distributed: gloo on cpu, NCCL on cuda with one GPU each);
    the global batch stays batch_size, split across them."""

    @model_validator(mode="after")
    def _batch_splits(self) -> "FinetuneSection":
        if self.processes > self.batch_size:
            raise ValueError(f"finetune.processes ({self.processes}) exceeds finetune.batch_size ({self.batch_size}): "
                             "every process needs at least one record per step")
        return self

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        from tasks.families import ALL_LINEAR, SEPARATE, FUSED

        allowed = {ALL_LINEAR, *SEPARATE, *FUSED}
        unknown = sorted(set(value) - allowed)
        if unknown or not value:
            raise ValueError(f"target_modules must be a non-empty list of \"{ALL_LINEAR}\" or decoder linear names "
                             f"({', '.join(sorted(allowed - {ALL_LINEAR}))}); {unknown[0]!r} is none of them"
                             if unknown else "target_modules must not be empty")
        if ALL_LINEAR in value and len(value) > 1:
            raise ValueError(f"target_modules: \"{ALL_LINEAR}\" already means every linear; list it alone")
        return tuple(sorted(set(value)))


Target = Literal["cpu", "cuda"]


class ExportSection(Section):
    targets: tuple[Target, ...] = ("cpu",)
    """Execution providers to export for, from one build; each gets its own folder <target>/."""
    adapter_name: str = Field("travel", pattern=r"^[A-Za-z0-9_.-]+$")
    """The adapter's name at inference and its file, <name>.onnx_adapter."""
    check_prompts: Annotated[Int, at_most(1000, "each prompt runs the model in both runtimes")] = Field(5, ge=1)
    """Held-out prompts whose last-token logits are compared, ONNX vs the AWQ checkpoint."""
    max_abs_logit_diff: Float = Field(0.01, gt=0)
    """Bound on |logits(ONNX) - logits(AWQ checkpoint)|; the stage fails past it."""
    min_cosine: Float = Field(0.99999, gt=0, le=1)
    """Bound on the cosine of those logits; the stage fails below it."""
    cuda_max_abs_logit_diff: Float = Field(0.25, gt=0)
    """The same bound for the cuda target, which computes in fp16 (the checkpoint is compared in fp32).
    fp16 rounding grows with depth and width: the 3.8B Phi-3.5-mini shape measured 0.102 / 0.99979 on
    an H100 (BENCHMARKS.md), the tiny model 1.5e-3; a broken export is off by whole logits."""
    cuda_min_cosine: Float = Field(0.999, gt=0, le=1)
    """The same bound for the cuda target."""
    adapter_mode: Literal["switchable", "merged"] = "switchable"
    """"switchable": the int4 base plus LoRA branches whose weights are graph inputs, and the adapter as
    an .onnx_adapter file (on and off at run time, more adapters by name). "merged": the adapter folded
    into the model and quantized again with the same AWQ settings; a plain graph that decodes as fast as
    the builder's own, no adapter file, and the held-out loss with and without merging in the report."""
    max_context: Annotated[Int, at_most(MAX_CONTEXT, CONTEXT_WHY)] | None = Field(None, ge=16)
    """Tokens of context (prompt + generated) the package supports; unset: the model's own. Within the
    model's original context (Phi-3's longrope: original_max_position_embeddings) the graph's switch
    between short and long rotary caches is replaced by the short caches, and the cuda target turns on
    onnxruntime-genai's CUDA graph. genai_config.json and the model card state the limit."""

    @field_validator("targets")
    @classmethod
    def _targets_unique(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError("targets must name each of cpu, cuda at most once, and at least one")
        return value

    def bounds(self, target: str) -> tuple[float, float]:
        """(max |d|, min cosine) of the export logit check for ``target``."""
        if target == "cuda":
            return self.cuda_max_abs_logit_diff, self.cuda_min_cosine
        return self.max_abs_logit_diff, self.min_cosine


class EvaluateSection(Section):
    prompts: Annotated[Int, at_most(1000, "each prompt is generated in full for every target and adapter")] = \
        Field(5, ge=1)
    """Held-out prompts generated with and without the adapter (report.md, tokens/s)."""
    max_new_tokens: Annotated[Int, at_most(4096, "Phi-3.5's original context is 4,096 positions")] = Field(40, ge=1)
    """Tokens generated per prompt."""
    loss_records: Annotated[Int, at_most(100_000, "each record is one more forward pass per adapter")] = \
        Field(16, ge=1)
    """Held-out records whose response loss is measured with and without the adapter."""


class AdapterData(Section):
    """One more adapter of the package, trained on its own dataset with the [finetune] settings."""

    path: str
    """JSON-lines dataset of this adapter ({"prompt": ..., "response": ...} per line)."""
    template: str | None = None
    """Training text template (same syntax as data.template); default: data.template."""


class CacheSection(Section):
    """The run cache (tasks/run_cache.py); read by the runner, never part of a stage's own inputs."""

    enabled: bool = True
    """Restore a stage's output from the cache when the same inputs built it before."""
    dir: str = ".cache/runs"
    """Relative to the project root, or absolute (a shared filesystem for a team or CI). A folder the
    project creates (or finds empty) and marks; one holding other files is refused. Entries are copies
    (copy-on-write clones, free of space, where the filesystem supports them: btrfs, XFS)."""
    max_size_gb: Annotated[Float, at_most(1_000_000, "that is a petabyte")] = Field(50.0, gt=0)
    """Least recently used entries are removed past this size (every entry counted in full)."""


# Key names that would hold a secret: the config is committed and hashed into logs, so credentials
# come from the environment only (see tasks/registries.py for which variables each registry reads).
SECRET_KEY_RE = re.compile(r"(token|password|secret|api_?key|credential)", re.IGNORECASE)


# Tracking URIs the MLflow registry is used through: a tracking server (http/https, as `mlflow server`
# runs it), Databricks, or an Azure ML workspace (its azureml:// URI, with the azureml-mlflow plugin).
# Not file:// or a bare path: MLflow 3 keeps its file store in maintenance mode and refuses it.
MLFLOW_SCHEMES = ("http", "https", "databricks", "azureml")


def tracking_uri_problem(uri: str) -> str | None:
    """Why MLflow cannot be used through ``uri`` as given, or None. Never quotes the URI: it may hold a secret."""
    from urllib.parse import urlsplit

    from tasks.secrets import uri_credentials

    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 (raises on a malformed port)
    except ValueError:
        return "is not a valid URI; write e.g. http://mlflow.internal:5000"
    found = uri_credentials(uri)
    if found:
        return (f"holds a credential ({', '.join(found)}); remove it from the URI and set MLFLOW_TRACKING_TOKEN "
                "(or MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD) in the environment instead")
    scheme = parts.scheme.lower() or ("databricks" if uri == "databricks" else "")
    if scheme == "file" or not scheme:
        return ("names a local file store, which MLflow keeps in maintenance mode and refuses; run `mlflow server "
                "--backend-store-uri sqlite:///mlflow.db` and use its http:// URI (supported: "
                f"{', '.join(MLFLOW_SCHEMES)})")
    if scheme not in MLFLOW_SCHEMES:
        return f"has the unsupported scheme {scheme!r}; use one of {', '.join(MLFLOW_SCHEMES)} (e.g. http://HOST:5000)"
    if scheme in ("http", "https") and not parts.hostname:
        return "names no host; write e.g. http://mlflow.internal:5000"
    return None


class MlflowRegistry(Section):
    tracking_uri: str = ""
    """MLflow tracking server (or an Azure ML workspace's MLflow URI); empty: $MLFLOW_TRACKING_URI."""
    experiment: str = "ondevice-llm-build"
    """Experiment that holds the publishing runs (one run per new version)."""

    @field_validator("tracking_uri")
    @classmethod
    def _usable_without_secrets(cls, value: str) -> str:
        problem = tracking_uri_problem(value) if value else None
        if problem:
            raise ValueError(f"the tracking URI {problem}")
        return value


class AzureMLRegistry(Section):
    subscription_id: str = ""
    """Empty: $AZURE_SUBSCRIPTION_ID."""
    resource_group: str = ""
    """Empty: $AZURE_RESOURCE_GROUP."""
    workspace: str = ""
    """Empty: $AZUREML_WORKSPACE_NAME."""


class HfHubRegistry(Section):
    private: bool = True
    """Create the model repository private when it does not exist yet."""
    branch: str = "main"
    """Branch that receives one commit per published version."""


# The Azure ML REST API's pattern for a model name (ModelVersions create, api-version 2023-04-01 and
# later; azure-ai-ml sends names unchecked, so the service is where it applies).
AZUREML_NAME_RE = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9\-_]{0,254}")


class PublishSection(Section):
    """Where ``doit publish`` registers the finished package; read by publish/fetch only, never by a stage."""

    registry: Literal["mlflow", "azureml", "hf"] = "mlflow"
    """Where `doit publish` registers the package: mlflow (also Azure ML through its MLflow URI), azureml, hf."""
    name: str = Field("ft-for-travel", min_length=1)
    """Registered model name (MLflow, Azure ML) or model repository id ``owner/name`` (hf)."""
    mlflow: MlflowRegistry = MlflowRegistry()
    azureml: AzureMLRegistry = AzureMLRegistry()
    hf: HfHubRegistry = HfHubRegistry()

    @model_validator(mode="after")
    def _name_fits_registry(self) -> "PublishSection":
        """Names every registry refuses, and the Hub's and Azure ML's own rules (cheap to check here; MLflow's
        rules are checked with MLflow's own validator when publish opens the registry, before any upload)."""
        if any(c in self.name for c in "'\"\\") or not self.name.isprintable():
            raise ValueError(f"publish.name {self.name!r} holds quotes, backslashes or control characters; "
                             "use letters, digits, '-', '_', '.'")
        if self.registry == "hf":
            from huggingface_hub.errors import HFValidationError
            from huggingface_hub.utils import validate_repo_id

            try:
                validate_repo_id(self.name)
            except HFValidationError as exc:
                raise ValueError(f"publish.name is not a Hub repository id: {exc}") from None
            if "/" not in self.name:
                raise ValueError(f"publish.name {self.name!r} is not a Hub repository id; write owner/name")
        if self.registry == "azureml" and not AZUREML_NAME_RE.fullmatch(self.name):
            raise ValueError(f"publish.name {self.name!r} is not a valid Azure ML model name (letters, digits, '-', "
                             "'_'; starting with a letter or digit; at most 255 characters)")
        return self


class ExecutorSection(Section):
    """Where stale stages run. doit decides what is stale either way; no stage reads this section, so
    switching executors never makes a stage stale."""

    kind: Literal["local", "ray"] = "local"
    """local: each stage runs in a process on this machine. ray: each stale stage is a Ray task on the
    cluster at `address` (tasks/ray_executor.py; docs/scaling-out.md)."""
    address: str | None = None
    """The Ray head, host:port (as printed by `ray start --head`). Required for kind = "ray"."""
    parallel: Int = Field(4, ge=1, le=256)
    """With kind = "ray": how many stale stages doit hands to the cluster at once (its -n)."""
    cpus_per_stage: Annotated[Float, at_most(4096, "no node has that many CPUs, so no stage could run")] = \
        Field(1, gt=0)
    """Ray num_cpus of a stage that computes on the CPU (a multi-process finetune asks for one per process)."""
    memory_gb: OptionalFloat = Field(None, gt=0)
    """Ray memory reservation per stage, if the cluster should not pack stages past its RAM."""
    retries: Int = Field(0, ge=0, le=10)
    """How many times a stage whose worker or node died runs again, as a new Ray task (0: the build stops and
    says which node)."""
    head_timeout_s: Annotated[Float, at_most(86_400, "a day; a lost head is not coming back")] = Field(30, gt=0)
    """How long the head may stay unreachable while a stage runs before the build stops and says so."""
    placement: dict[str, dict[str, Float]] = {}
    """Extra Ray resources per stage name, e.g. {finetune = {gpu_node_a = 1}}: pins a stage to the
    nodes started with that custom resource."""

    @model_validator(mode="after")
    def _ray_needs_address(self) -> "ExecutorSection":
        if self.kind == "ray" and not self.address:
            raise ValueError('kind = "ray" needs address = "HOST:PORT" of the Ray head (see `ray start --head`)')
        return self


class PipelineConfig(Section):
    build: BuildSection = BuildSection()
    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    quantize: QuantizeSection = QuantizeSection()
    finetune: FinetuneSection = FinetuneSection()
    export: ExportSection = ExportSection()
    evaluate: EvaluateSection = EvaluateSection()
    publish: PublishSection = PublishSection()
    cache: CacheSection = CacheSection()
    executor: ExecutorSection = ExecutorSection()
    adapters: dict[str, AdapterData] = {}
    """Adapters beyond [data] (named export.adapter_name): {name: dataset}. One base, one package, one
    .onnx_adapter per name; adding one trains and exports only that one."""
    matrix: dict[str, Any] = {}
    """Experiment grid for `doit matrix` (tasks/matrix.py): {section: {key: [values]}}; read by no stage."""

    @field_validator("matrix")
    @classmethod
    def _small_valid_grid(cls, grid: dict) -> dict:
        if not grid:
            return grid
        from tasks.matrix import check_grid

        check_grid(grid)
        return grid

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, adapters: dict) -> dict:
        for name in adapters:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '_' and '-' (it names files and stages)")
        return adapters

    @model_validator(mode="after")
    def _primary_adapter_not_repeated(self) -> "PipelineConfig":
        if self.adapters and self.export.adapter_mode == "merged":
            raise ValueError(f"export.adapter_mode = \"merged\" folds one adapter into the model; [adapters] "
                             f"({', '.join(sorted(self.adapters))}) need adapter_mode = \"switchable\"")
        if self.export.adapter_name in self.adapters:
            raise ValueError(f"adapters.{self.export.adapter_name} repeats export.adapter_name, the adapter trained "
                             "on [data]; give it another name")
        for name in self.adapters:
            try:
                adapter_data(self, name)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(["adapters", name, *(str(p) for p in first["loc"])])
                raise ValueError(f"{where}: {first['msg'].removeprefix('Value error, ')}") from None
        return self

    @model_validator(mode="after")
    def _matrix_points_valid(self) -> "PipelineConfig":
        """Every point must be a valid config itself (a bad value fails now, not after an hour of builds)."""
        if self.matrix:
            from tasks.matrix import points

            base = self.model_dump(mode="json", exclude={"matrix"})
            for point in points(self.matrix):
                raw = json.loads(json.dumps(base))
                for text in point.overrides:
                    _apply_override(raw, *parse_override(text))
                try:
                    PipelineConfig.model_validate(raw)
                except ValidationError as exc:
                    raise ValueError(_describe(exc, f"matrix point {point.slug}")) from None
        return self


def adapter_data(cfg: "PipelineConfig", name: str) -> DataSection:
    """The [data] settings an extra adapter trains with: its own file and template, the shared split."""
    spec = cfg.adapters[name]
    return DataSection(path=spec.path, template=spec.template or cfg.data.template,
                       eval_fraction=cfg.data.eval_fraction, split_seed=cfg.data.split_seed)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``finetune.rank=16`` -> (["finetune", "rank"], 16); the value is read as TOML, else as a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise PipelineError(f"override {text!r} is not KEY=VALUE; write e.g. finetune.rank=16")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def _apply_override(raw: dict, dotted: list[str], value: Any) -> None:
    node = raw
    for part in dotted[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise PipelineError(f"override {'.'.join(dotted)}: {part} is not a section")
    node[dotted[-1]] = value


def _known_keys(loc: tuple) -> list[str]:
    """Field names of the section that holds ``loc`` (for a did-you-mean hint)."""
    model: Any = PipelineConfig
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = field.annotation
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _describe(error: ValidationError, source: str) -> str:
    import difflib

    first = error.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden" and SECRET_KEY_RE.search(str(first["loc"][-1])):
        return (f"{source}: {where!r} looks like a credential; secrets are read from the environment only, never "
                "from the config (MLFLOW_TRACKING_TOKEN, HF_TOKEN, AZURE_CLIENT_SECRET...): remove the key")
    if first["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(first["loc"][-1]), _known_keys(first["loc"]), n=1, cutoff=0.6)
        if close:
            suggestion = ".".join([*(str(p) for p in first["loc"][:-1]), close[0]])
            return f"{source}: unknown key {where!r}; did you mean {suggestion!r}?"
        return f"{source}: unknown key {where!r}; remove it or check its spelling against docs/configuration.md"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] in ("tuple_type", "list_type"):
        msg += f"; write a list, e.g. {where}='[\"a\", \"b\"]' on the command line or {where.rsplit('.', 1)[-1]} = [\"a\"] in the file"
    return f"{source}: {msg}" if not first["loc"] else f"{source}: {where}: {msg}"


def load_config(path: str | Path = "pipeline.toml", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read, override and validate; raise PipelineError with one line naming key and fix."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"config file {path} not found; pass config=PATH to doit or create it from pipeline.toml")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: not valid TOML ({exc}); fix the syntax") from None
    given = {}
    for text in overrides:
        dotted, value = parse_override(text)
        _apply_override(raw, dotted, value)
        given[".".join(dotted)] = text
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        where = ".".join(str(p) for p in exc.errors()[0]["loc"])
        blamed = [text for key, text in given.items() if where == key or where.startswith(key + ".")]
        # one line, whatever was typed
        source = f"command line ({' '.join(blamed[0].partition('=')[0].split())}=...)" if blamed else str(path)
        raise PipelineError(_describe(exc, source)) from None

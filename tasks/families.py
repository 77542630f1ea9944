"""Model families: everything the stages must know about an architecture, one entry per family.

A family is recognised by config.json's ``model_type``. Its entry says which linears of a decoder
block LoRA may target and which output rows of the block each one computes (its *parts*: q, k, v,
o, gate, up, down), how a random-init model of the family is built locally (the tiny profile and
the shape profiles), and the chat format such a model gets. Everything else is read from the model
itself: part sizes from config.json, the model builder's int4 MatMul nodes from the exported graph.

Export matches the two sides by parts, never by family: Phi-3's fused ``qkv_proj`` that the builder
keeps fused, its ``gate_up_proj`` that the builder splits into ``gate_proj`` and ``up_proj``, and
Llama's separate ``q_proj``/``k_proj``/``v_proj`` that the builder packs into one ``qkv_proj`` are
the same rule (tasks/export.py). Adding a family is one entry below, when AutoAWQ and the model
builder both support its architecture (awq/models/auto.py; onnxruntime_genai/models/builder.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tasks.errors import PipelineError

ATTN, MLP = "self_attn", "mlp"
# PEFT's shorthand for "every linear of the decoder blocks" (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND).
ALL_LINEAR = "all-linear"

# HF linear name -> (block, output parts in row order)
SEPARATE = {"q_proj": (ATTN, ("q",)), "k_proj": (ATTN, ("k",)), "v_proj": (ATTN, ("v",)), "o_proj": (ATTN, ("o",)),
            "gate_proj": (MLP, ("gate",)), "up_proj": (MLP, ("up",)), "down_proj": (MLP, ("down",))}
FUSED = {"qkv_proj": (ATTN, ("q", "k", "v")), "o_proj": (ATTN, ("o",)),
         "gate_up_proj": (MLP, ("gate", "up")), "down_proj": (MLP, ("down",))}
# The model builder's MatMul names (/model/layers.N/{attn,mlp}/<name>/MatMulNBits) and their parts:
# onnxruntime-genai packs or splits projections by execution provider and precision.
BUILDER_PARTS = {"qkv_proj": ("q", "k", "v"), "gate_up_proj": ("gate", "up"),
                 **{name: parts for name, (_, parts) in SEPARATE.items()}}


def part_sizes(config: dict) -> dict[str, int]:
    """Output rows of each part, from config.json (head_dim where the family decouples it from hidden)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv = config.get("num_key_value_heads") or heads
    return {"q": heads * head_dim, "k": kv * head_dim, "v": kv * head_dim, "o": config["hidden_size"],
            "gate": config["intermediate_size"], "up": config["intermediate_size"], "down": config["hidden_size"]}


# --- chat formats of the locally built models (each family's real turn markers) -----------------

PHI3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
    "{% set system.text = '' %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    model_type: str
    label: str
    linears: dict[str, tuple[str, tuple[str, ...]]]
    # A locally built model of the family: special tokens (their order fixes their ids), which of them
    # are bos/eos/pad and end a turn, the chat template, and the structural config options.
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str
    end_of_turn: tuple[str, ...]
    chat_template: str
    structure: dict[str, Any] = field(default_factory=dict)
    gqa: bool = True  # the locally built model uses grouped-query attention (half as many KV heads)

    def target_modules(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """LoRA target linears for ``finetune.target_modules`` (``all-linear`` = every one), sorted."""
        if ALL_LINEAR in requested:
            return tuple(sorted(self.linears))
        unknown = sorted(set(requested) - set(self.linears))
        if unknown:
            raise PipelineError(
                f"finetune.target_modules: {self.label} has no linear {unknown[0]!r}; its decoder linears are "
                f"{', '.join(sorted(self.linears))} (or \"{ALL_LINEAR}\", the default)")
        return tuple(sorted(set(requested)))


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("phi3", "Phi-3/3.5", FUSED, ("<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"),
           bos="<|endoftext|>", eos="<|endoftext|>", pad="<|endoftext|>", end_of_turn=("<|end|>", "<|endoftext|>"),
           chat_template=PHI3_TEMPLATE, gqa=False),
    Family("llama", "Llama", SEPARATE,
           ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
           bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|end_of_text|>", end_of_turn=("<|eot_id|>", "<|end_of_text|>"),
           chat_template=LLAMA3_TEMPLATE,
           structure={"rope_theta": 500000.0, "tie_word_embeddings": True, "max_position_embeddings": 131072,
                      "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}),
    Family("mistral", "Mistral", SEPARATE, ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"),
           bos="<s>", eos="</s>", pad="</s>", end_of_turn=("</s>",), chat_template=MISTRAL_TEMPLATE,
           structure={"rope_theta": 1000000.0, "tie_word_embeddings": False, "sliding_window": None,
                      "max_position_embeddings": 32768}),
    Family("qwen2", "Qwen2/2.5", SEPARATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn=("<|im_end|>", "<|endoftext|>"),
           chat_template=CHATML_TEMPLATE,  # Qwen2 has biases on q, k and v
           structure={"rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 32768}),
    Family("qwen3", "Qwen3", SEPARATE, ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
           bos=None, eos="<|im_end|>", pad="<|endoftext|>", end_of_turn=("<|im_end|>", "<|endoftext|>"),
           chat_template=CHATML_TEMPLATE,  # Qwen3: q/k RMS norms, head_dim decoupled from hidden_size
           structure={"rope_theta": 1000000.0, "tie_word_embeddings": True, "max_position_embeddings": 40960,
                      "head_dim": 64}),
    Family("gemma2", "Gemma 2", SEPARATE, ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"),
           bos="<bos>", eos="<end_of_turn>", pad="<pad>", end_of_turn=("<end_of_turn>", "<eos>"),
           chat_template=GEMMA_TEMPLATE,
           structure={"tie_word_embeddings": True, "head_dim": 64, "query_pre_attn_scalar": 64,
                      "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "sliding_window": 4096,
                      "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 8192}),
)}
SUPPORTED = ", ".join(f"{f.label} ({f.model_type})" for f in FAMILIES.values())


def family_of(config: dict, source: str) -> Family:
    """The family of a model's config.json, or a one-line refusal naming the supported ones."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    arch = ", ".join(config.get("architectures") or []) or "no architectures listed"
    raise PipelineError(f"{source}: model_type {model_type!r} ({arch}) is not a supported family; supported: {SUPPORTED}")

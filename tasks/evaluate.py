"""Stage 5, evaluate: the finished package, checked with onnxruntime_genai as a user would run it.

Output (the package users ship): everything of the export stage, plus
- ``report.json`` / ``report.md``: greedy generations for held-out prompts with and without the
  adapter, held-out loss and perplexity of the response tokens with and without the adapter;
- ``speed.json``: decode tokens/s. Timing is the one thing in the package that is not reproducible
  byte for byte, so it lives in its own file;
- ``README.md``: a model card with provenance (digests of every stage's manifest).
The stage fails if the adapter changes nothing or the model generates nothing.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

from tasks.config import EvaluateSection, ExportSection
from tasks.data import Record, Render, full_text, genai_renderer, prompt_part, prompt_text, read_heldout
from tasks.errors import PipelineError
from tasks.manifest import MANIFEST, clone_tree
from tasks.devices import NO_GPU, target_runs_here
from tasks.genai import ADAPTER_SUFFIX, all_logits, open_model, stream
from tasks import disk
from tasks.stage_spec import Stage, runs_cuda_target

log = logging.getLogger(__name__)


def copy_package(src: Path, dst: Path) -> None:
    """The export files, cloned (a package a user edits never reaches export/); the export's manifest stays behind."""
    clone_tree(src, dst, exclude=(MANIFEST,))


def response_loss(model, adapters, adapter, tokenizer, render_chat: Render, record: Record) -> tuple[float, int]:
    """Summed cross-entropy of the final answer's tokens (with its turn's closing marker) given every
    earlier turn, and their count."""
    import numpy as np

    prompt_ids = list(tokenizer.encode(prompt_text(render_chat, record)))
    ids = list(tokenizer.encode(full_text(render_chat, record)))
    logits = all_logits(model, adapters, adapter, ids)
    total = 0.0
    for pos in range(len(prompt_ids), len(ids)):
        row = logits[pos - 1].astype(np.float64)
        log_z = row.max() + math.log(np.exp(row - row.max()).sum())
        total += log_z - row[ids[pos]]
    return total, len(ids) - len(prompt_ids)


def evaluate_target(folder: Path, target: str, section: EvaluateSection, name: str, template: str | None,
                    held: list[Record]) -> tuple[dict, dict]:
    """Quality (held-out loss, generations, adapter effect) and decode speed of one target's model."""
    import numpy as np
    import onnxruntime_genai as og

    model, adapters = open_model(folder, target, {name: folder / f"{name}{ADAPTER_SUFFIX}"})
    tokenizer = og.Tokenizer(model)
    render_chat = genai_renderer(tokenizer, template)  # the package's own chat template unless data.template
    quality: dict = {"loss": {}, "generations": []}
    for label, adapter in (("without_adapter", None), ("with_adapter", name)):
        total, count = 0.0, 0
        for record in held[: section.loss_records]:
            s, n = response_loss(model, adapters, adapter, tokenizer, render_chat, record)
            total, count = total + s, count + n
        quality["loss"][label] = {"loss": round(total / count, 5), "perplexity": round(math.exp(total / count), 3),
                                  "tokens": count}
        log.info("%s: held-out loss %s: %.4f (perplexity %.2f) over %d tokens", target, label, total / count,
                 math.exp(total / count), count)
    ids = list(tokenizer.encode(prompt_text(render_chat, held[0])))
    max_shift = float(np.abs(all_logits(model, adapters, None, ids) - all_logits(model, adapters, name, ids)).max())

    speed = {"without_adapter": [], "with_adapter": []}
    for record in held[: section.prompts]:
        prompt = prompt_text(render_chat, record)
        entry = {"prompt": record.prompt, "reference": record.response}
        for label, adapter in (("without_adapter", None), ("with_adapter", name)):
            start = time.perf_counter()
            pieces = list(stream(model, tokenizer, adapters, adapter, prompt, section.max_new_tokens))
            elapsed = time.perf_counter() - start
            entry[label] = "".join(pieces)
            speed[label].append(len(pieces) / elapsed if elapsed > 0 else 0.0)
        quality["generations"].append(entry)
        log.info("%s: %r\n    without adapter: %r\n    with adapter:    %r", target, record.prompt,
                 entry["without_adapter"][:120], entry["with_adapter"][:120])

    # Whitespace counts, and an adapter may have learned to end its turn at once (a small model trained
    # briefly does); no token at all, with the adapter and without, for every prompt is a broken package.
    if not any(g["with_adapter"] or g["without_adapter"] for g in quality["generations"]):
        raise PipelineError(f"the {target} package generated no token for any held-out prompt; check the finetune log")
    if max_shift < 1e-4:
        raise PipelineError(f"the adapter has no effect on the {target} model (max logit change {max_shift:.2e}); "
                            "check the finetune and export logs")
    quality["max_logit_shift_from_adapter"] = round(max_shift, 4)
    return quality, {k: round(sum(v) / len(v), 1) for k, v in speed.items()}


def add_extra_adapters(out: Path, extra: dict[str, tuple[Path, Path]], section: EvaluateSection,
                       export: ExportSection) -> dict:
    """Link each extra adapter's files beside the base and evaluate it by name, on its own held-out set."""
    report: dict = {}
    for name, (adapter_dir, finetune_dir) in sorted(extra.items()):
        clone_tree(adapter_dir, out, exclude=(MANIFEST, "adapter_check.json"))
        template, held = read_heldout(finetune_dir)
        report[name] = {"heldout_records": len(held), "targets": {}}
        for target in export.targets:
            if target_runs_here(target):
                quality, _ = evaluate_target(out / target, target, section, name, template, held)
                report[name]["targets"][target] = {"evaluated": True, **quality}
    return report


STAGE = Stage(
    "evaluate", "package = export + report (texts, tokens/s, held-out loss with/without adapter) + model card",
    upstream=("export", "finetune"), keys=("evaluate", "export.targets", "export.adapter_name"),
    entry="tasks.evaluate:run", gpu=runs_cuda_target, disk=disk.need_evaluate,
)

def run(cfg, paths, out: Path) -> dict:
    """The stage's entry (STAGE above): the package, with the provenance of every stage before it
    and the extra adapters of [adapters]."""
    from tasks.manifest import manifest_digest, read_manifest
    from tasks.stages import ADAPTER_PREFIX, FINETUNE_PREFIX, stages_for, upstream_closure

    provenance = {up: {**read_manifest(paths.stage(up)), "manifest_sha256": manifest_digest(paths.stage(up))}
                  for up in upstream_closure("evaluate", stages_for(cfg))}
    extra = {adapter: (paths.stage(ADAPTER_PREFIX + adapter), paths.stage(FINETUNE_PREFIX + adapter))
             for adapter in sorted(cfg.adapters)}
    return build(paths.stage("export"), paths.stage("finetune"), cfg.evaluate, cfg.export, out, provenance, extra,
                 paths.stage("base") / "README.md")


def build(export_dir: Path, finetune_dir: Path, section: EvaluateSection, export: ExportSection,
          out: Path, provenance: dict, extra: dict[str, tuple[Path, Path]] | None = None,
          base_readme: Path | None = None) -> dict:
    copy_package(export_dir, out)
    name = export.adapter_name
    template, held = read_heldout(finetune_dir)

    # chat (tasks/chat.py) renders turns the way the adapter was trained: data.template, or null for the
    # package's own chat template (chat_template.jinja)
    report: dict = {"adapter": name, "heldout_records": len(held), "template": template, "targets": {}}
    speed: dict = {"max_new_tokens": section.max_new_tokens, "decode_tokens_per_s": {}}
    for target in export.targets:
        if not target_runs_here(target):
            log.warning("%s model NOT evaluated: this host has no CUDA GPU", target)
            report["targets"][target] = {"evaluated": False, "reason": NO_GPU}
            continue
        quality, tokens_per_s = evaluate_target(out / target, target, section, name, template, held)
        report["targets"][target] = {"evaluated": True, **quality}
        speed["decode_tokens_per_s"][target] = tokens_per_s
        log.info("%s: decode speed (tokens/s): %s", target, tokens_per_s)
    if extra:
        report["extra_adapters"] = add_extra_adapters(out, extra, section, export)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    plot_loss_curve(json.loads((finetune_dir / "metrics.json").read_text(encoding="utf-8"))["loss"], out / LOSS_CURVE)
    (out / "report.md").write_text(render_summary(report), encoding="utf-8")
    (out / "README.md").write_text(render_model_card(report, provenance, export, base_license(base_readme)),
                                   encoding="utf-8")
    facts = {target: {"loss": r["loss"], "max_logit_shift_from_adapter": r["max_logit_shift_from_adapter"]}
             for target, r in report["targets"].items() if r["evaluated"]}
    for other, result in report.get("extra_adapters", {}).items():
        facts[f"adapter {other}"] = {target: r["loss"] for target, r in result["targets"].items()}
    return facts


LOSS_CURVE = "loss_curve.png"


def plot_loss_curve(history: dict, path: Path) -> None:
    """The finetune's training and held-out loss per step, as a PNG beside the report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for label, points, style in (("train (batch)", history["train"], "-"), ("held-out", history["eval"], "o-")):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (response tokens)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def base_license(base_readme: Path | None) -> str | None:
    """The license in the base model's own card (a Hub model's README.md front matter), if it states one."""
    if not base_readme or not base_readme.is_file():
        return None
    from huggingface_hub import ModelCard

    try:
        return ModelCard.load(base_readme).data.license
    except Exception:  # a README without front matter, or one huggingface_hub cannot parse: no license known
        return None


def render_summary(report: dict) -> str:
    lines = ["# Evaluation summary", "", f"Held-out records: {report['heldout_records']}; adapter `{report['adapter']}`.", "",
             f"![training and held-out loss]({LOSS_CURVE})", ""]
    for other, result in report.get("extra_adapters", {}).items():
        for target, quality in result["targets"].items():
            loss = quality["loss"]
            lines.append(f"Adapter `{other}` ({target}, its own {result['heldout_records']} held-out records): loss "
                         f"{loss['without_adapter']['loss']} without, {loss['with_adapter']['loss']} with; largest logit "
                         f"change {quality['max_logit_shift_from_adapter']}.")
    if report.get("extra_adapters"):
        lines.append("")
    for target, quality in report["targets"].items():
        lines += [f"## {target}", ""]
        if not quality["evaluated"]:
            lines += [f"Not evaluated: {quality['reason']}.", ""]
            continue
        loss = quality["loss"]
        lines += ["| | loss | perplexity | tokens |", "|---|---|---|---|"]
        for label in ("without_adapter", "with_adapter"):
            lines.append(f"| {label.replace('_', ' ')} | {loss[label]['loss']} | {loss[label]['perplexity']} | {loss[label]['tokens']} |")
        lines += ["", f"Largest logit change caused by the adapter: {quality['max_logit_shift_from_adapter']}", "",
                  "### Generations (greedy)", ""]
        for g in quality["generations"]:
            lines += [f"**{g['prompt']}**", "", f"- without adapter: {g['without_adapter']!r}",
                      f"- with adapter: {g['with_adapter']!r}", f"- reference: {g['reference']!r}", ""]
    return "\n".join(lines)


def render_model_card(report: dict, provenance: dict, export: ExportSection, license: str | None = None) -> str:
    """README.md of the package: a Hugging Face model card (huggingface_hub's ModelCard) whose metadata
    names the base model, library, tags and the base's license, and whose text says what was built."""
    from huggingface_hub import ModelCard, ModelCardData

    base = provenance.get("base", {}).get("facts", {})
    quant = provenance.get("quantize", {}).get("config", {}).get("quantize", {})
    tune = provenance.get("finetune", {}).get("config", {}).get("finetune", {})
    targets = provenance.get("finetune", {}).get("facts", {}).get("target_modules") or tune.get("target_modules", [])
    if base.get("source") == "hub":
        source = f"{base.get('repo_id')} at commit {base.get('revision')}"
    elif base.get("source") == "local":
        source = f"the local model folder {base.get('path')}"
    elif base.get("profile", "tiny") == "tiny":
        from tasks.families import FAMILIES

        label = FAMILIES[base.get("family", "phi3")].label
        source = f"the project's tiny random-init {label} model (the family's architecture, small sizes)"
    else:
        source = f"random-init weights with the exact sizes of profile {base.get('profile')} (a benchmark model: it knows nothing)"
    first = next(t for t in export.targets)
    lines = [
        "# ONNX Runtime GenAI package: AWQ int4 base + LoRA adapter", "",
        f"- Base model: {source}.",
        f"- Quantization: AWQ {quant.get('bits')}-bit, group size {quant.get('group_size')}, zero point "
        f"{quant.get('zero_point')}, exported as MatMulNBits for the execution providers "
        f"{', '.join(export.targets)}, one folder each.",
        f"- Adapter `{export.adapter_name}` (`{export.adapter_name}{ADAPTER_SUFFIX}`): LoRA rank {tune.get('rank')}, "
        f"alpha {tune.get('alpha')}, {tune.get('max_steps')} steps on {', '.join(targets)}.",
    ]
    for target, quality in report["targets"].items():
        if quality["evaluated"]:
            loss = quality["loss"]
            lines.append(f"- Held-out loss ({target}): {loss['without_adapter']['loss']} without the adapter, "
                         f"{loss['with_adapter']['loss']} with it.")
        else:
            lines.append(f"- {target}: not evaluated ({quality['reason']}).")
    for other in report.get("extra_adapters", {}):
        lines.append(f"- Adapter `{other}` (`{other}{ADAPTER_SUFFIX}`): the same LoRA settings, trained on its own "
                     "dataset; load it beside the others and switch by name (report.md).")
    lines += [
        "", "## Use", "", "```python", "import json", "import onnxruntime_genai as og",
        f"model = og.Model('{first}')", "tokenizer = og.Tokenizer(model)", "adapters = og.Adapters(model)",
        f"adapters.load('{first}/{export.adapter_name}{ADAPTER_SUFFIX}', '{export.adapter_name}')",
        "params = og.GeneratorParams(model)", "params.set_search_options(max_length=256)",
        "generator = og.Generator(model, params)",
        f"generator.set_active_adapter(adapters, '{export.adapter_name}')  # omit for the base model",
        *(["prompt = tokenizer.apply_chat_template(json.dumps([{'role': 'user', 'content': "
            "'what is the best thing to see in chicago'}]), add_generation_prompt=True)"]
          if report.get("template") is None else
          [f"prompt = {prompt_part(report['template'], 'what is the best thing to see in chicago')!r}  # data.template"]),
        "generator.append_tokens(tokenizer.encode(prompt))",
        "```", "", f"Or: `python -m tasks chat --package . --target {first}`", "",
        "## Provenance (sha256 of each stage's MANIFEST.json)", "",
    ]
    for stage, manifest in provenance.items():
        lines.append(f"- {stage}: `{manifest['manifest_sha256']}`")
    lines.append("")
    family = base.get("family")
    data = ModelCardData(
        library_name="onnxruntime-genai", pipeline_tag="text-generation", license=license,
        base_model=base.get("repo_id") if base.get("source") == "hub" else None,
        tags=sorted({"onnx", "onnxruntime-genai", "awq", "int4", "lora", *([family] if family else [])}),
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))

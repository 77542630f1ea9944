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
from tasks.genai import ADAPTER_SUFFIX, all_logits, context_length, open_model, stream
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
    limit = context_length(model)
    if limit is not None and len(ids) >= limit:
        ids = ids[: limit - 1]  # the package's context (export.max_context), as finetune cuts at max_seq_len
    if len(ids) <= len(prompt_ids):
        return 0.0, 0  # the answer starts past the context
    logits = all_logits(model, adapters, adapter, ids)
    total = 0.0
    for pos in range(len(prompt_ids), len(ids)):
        row = logits[pos - 1].astype(np.float64)
        log_z = row.max() + math.log(np.exp(row - row.max()).sum())
        total += log_z - row[ids[pos]]
    return total, len(ids) - len(prompt_ids)


def evaluate_target(folder: Path, target: str, section: EvaluateSection, name: str, template: str | None,
                    held: list[Record], merged: bool = False) -> tuple[dict, dict]:
    """Quality (held-out loss, generations, adapter effect) and decode speed of one target's model. A
    merged package (export.adapter_mode) is the adapted model itself: "with_adapter" only."""
    import numpy as np
    import onnxruntime_genai as og

    model, adapters = open_model(folder, target, {} if merged else {name: folder / f"{name}{ADAPTER_SUFFIX}"})
    tokenizer = og.Tokenizer(model)
    render_chat = genai_renderer(tokenizer, template)  # the package's own chat template unless data.template
    quality: dict = {"loss": {}, "generations": []}
    runs = (("with_adapter", None),) if merged else (("without_adapter", None), ("with_adapter", name))
    for label, adapter in runs:
        total, count = 0.0, 0
        for record in held[: section.loss_records]:
            s, n = response_loss(model, adapters, adapter, tokenizer, render_chat, record)
            total, count = total + s, count + n
        if not count:
            raise PipelineError(f"no held-out answer starts within the {target} package's context of "
                                f"{context_length(model)} tokens; raise export.max_context")
        quality["loss"][label] = {"loss": round(total / count, 5), "perplexity": round(math.exp(total / count), 3),
                                  "tokens": count}
        log.info("%s: held-out loss %s: %.4f (perplexity %.2f) over %d tokens", target, label, total / count,
                 math.exp(total / count), count)
    speed: dict[str, list[float]] = {label: [] for label, _ in runs}
    for record in held[: section.prompts]:
        prompt = prompt_text(render_chat, record)
        entry = {"prompt": record.prompt, "reference": record.response}
        if len(tokenizer.encode(prompt)) >= (context_length(model) or math.inf):
            log.warning("%s: held-out prompt at line %d is longer than the package's context; not generated",
                        target, record.line)
            continue
        for label, adapter in runs:
            start = time.perf_counter()
            pieces = list(stream(model, tokenizer, adapters, adapter, prompt, section.max_new_tokens))
            elapsed = time.perf_counter() - start
            entry[label] = "".join(pieces)
            speed[label].append(len(pieces) / elapsed if elapsed > 0 else 0.0)
        quality["generations"].append(entry)
        log.info("%s: %r%s", target, record.prompt,
                 "".join(f"\n    {label.replace('_', ' ') + ':':17} {entry[label][:120]!r}" for label, _ in runs))

    # Whitespace counts, and an adapter may have learned to end its turn at once (a small model trained
    # briefly does); no token at all, with the adapter and without, for every prompt is a broken package.
    if not quality["generations"]:
        raise PipelineError(f"no held-out prompt fits the {target} package's context of {context_length(model)} "
                            "tokens; raise export.max_context")
    if not any(g[label] for g in quality["generations"] for label, _ in runs):
        raise PipelineError(f"the {target} package generated no token for any held-out prompt; check the finetune log")
    if not merged:
        ids = list(tokenizer.encode(prompt_text(render_chat, held[0])))
        ids = ids[: context_length(model) - 1] if context_length(model) else ids
        max_shift = float(np.abs(all_logits(model, adapters, None, ids) - all_logits(model, adapters, name, ids)).max())
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
    upstream=("export", "finetune"),
    keys=("evaluate", "export.targets", "export.adapter_name", "export.max_context"),
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
    first = out / export.targets[0] / "genai_config.json"
    context = json.loads(first.read_text(encoding="utf-8"))["model"]["context_length"]
    merged = export.adapter_mode == "merged"
    report: dict = {"adapter": name, "adapter_mode": export.adapter_mode, "heldout_records": len(held),
                    "template": template, "context_length": context, "targets": {}}
    if merged:  # the held-out loss with and without merging, measured by export (tasks/merge.py)
        report["merge"] = json.loads((export_dir / "export_check.json").read_text(encoding="utf-8"))["merge"]
    speed: dict = {"max_new_tokens": section.max_new_tokens, "decode_tokens_per_s": {}}
    for target in export.targets:
        if not target_runs_here(target):
            log.warning("%s model NOT evaluated: this host has no CUDA GPU", target)
            report["targets"][target] = {"evaluated": False, "reason": NO_GPU}
            continue
        quality, tokens_per_s = evaluate_target(out / target, target, section, name, template, held, merged)
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
    facts = {target: {"loss": r["loss"], "max_logit_shift_from_adapter": r.get("max_logit_shift_from_adapter")}
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
    if "merge" in report:
        m = report["merge"]
        kept = "n/a" if m["gain_kept"] is None else f"{m['gain_kept']:.0%}"
        lines += ["## Merging", "", "The adapter is merged into the model and quantized again (export.adapter_mode). "
                  f"Held-out loss over {m['tokens']} answer tokens, PyTorch twins: base {m['base']}, base + LoRA "
                  f"{m['unmerged']}, merged and requantized {m['merged']} ({kept} of the adapter's gain kept).", ""]
        if m.get("warning"):
            lines += [f"**Warning:** {m['warning']}.", ""]
    for target, quality in report["targets"].items():
        lines += [f"## {target}", ""]
        if not quality["evaluated"]:
            lines += [f"Not evaluated: {quality['reason']}.", ""]
            continue
        loss = quality["loss"]
        lines += ["| | loss | perplexity | tokens |", "|---|---|---|---|"]
        for label in loss:
            name = "adapter merged" if report.get("adapter_mode") == "merged" else label.replace("_", " ")
            lines.append(f"| {name} | {loss[label]['loss']} | {loss[label]['perplexity']} | {loss[label]['tokens']} |")
        if "max_logit_shift_from_adapter" in quality:
            lines += ["", f"Largest logit change caused by the adapter: {quality['max_logit_shift_from_adapter']}"]
        lines += ["", "### Generations (greedy)", ""]
        for g in quality["generations"]:
            lines += [f"**{g['prompt']}**", ""]
            lines += [f"- {label.replace('_', ' ')}: {g[label]!r}" for label in loss]
            lines += [f"- reference: {g['reference']!r}", ""]
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
    merged = export.adapter_mode == "merged"
    lines = [
        "# ONNX Runtime GenAI package: AWQ int4 base + LoRA adapter", "",
        f"- Base model: {source}.",
        f"- Quantization: AWQ {quant.get('bits')}-bit, group size {quant.get('group_size')}, zero point "
        f"{quant.get('zero_point')}, exported as MatMulNBits for the execution providers "
        f"{', '.join(export.targets)}, one folder each.",
        f"- Adapter `{export.adapter_name}` "
        + ("merged into the weights and quantized again (export.adapter_mode = \"merged\"; no adapter file)"
           if merged else f"(`{export.adapter_name}{ADAPTER_SUFFIX}`)")
        + f": LoRA rank {tune.get('rank')}, alpha {tune.get('alpha')}, {tune.get('max_steps')} steps on "
        f"{', '.join(targets)}.",
    ]
    if report.get("context_length"):
        origin = "export.max_context" if export.max_context else "the model's own"
        lines.append(f"- Context: {report['context_length']:,} tokens in all, prompt and generated ({origin}; "
                     "genai_config.json context_length). Keep prompts shorter: onnxruntime-genai 0.14.1 "
                     "aborts on a longer one instead of refusing it.")
    for target, quality in report["targets"].items():
        if quality["evaluated"]:
            loss = quality["loss"]
            if "without_adapter" in loss:
                lines.append(f"- Held-out loss ({target}): {loss['without_adapter']['loss']} without the adapter, "
                             f"{loss['with_adapter']['loss']} with it.")
            else:
                lines.append(f"- Held-out loss ({target}): {loss['with_adapter']['loss']} (adapter merged).")
        else:
            lines.append(f"- {target}: not evaluated ({quality['reason']}).")
    for other in report.get("extra_adapters", {}):
        lines.append(f"- Adapter `{other}` (`{other}{ADAPTER_SUFFIX}`): the same LoRA settings, trained on its own "
                     "dataset; load it beside the others and switch by name (report.md).")
    lines += [
        "", "## Use", "", "```python", "import json", "import onnxruntime_genai as og",
        f"model = og.Model('{first}')", "tokenizer = og.Tokenizer(model)",
        *([] if merged else ["adapters = og.Adapters(model)",
                             f"adapters.load('{first}/{export.adapter_name}{ADAPTER_SUFFIX}', '{export.adapter_name}')"]),
        "params = og.GeneratorParams(model)", "params.set_search_options(max_length=256)",
        "generator = og.Generator(model, params)",
        *([] if merged else [f"generator.set_active_adapter(adapters, '{export.adapter_name}')  # omit for the base model"]),
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

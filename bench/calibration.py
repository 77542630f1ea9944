"""The benchmark's calibration set: AutoAWQ's default size (128 samples of up to 512 tokens).

The project's own calibration file has short paragraphs (about 10k tokens in all), which AWQ would
turn into ~14 blocks; the lab calibrates on 128 x 512 tokens. To compare like with like, the
benchmark joins the project's paragraphs (calibration text, then tokenizer corpus) into lines of
at most 512 tokens of the model's tokenizer (cycling through them if they run out). Deterministic: same files, same tokenizer, same lines.
"""

from __future__ import annotations

from pathlib import Path

SOURCES = ("data/calibration.txt", "data/tokenizer_corpus.txt")


def write_benchmark_calibration(repo: Path, tokenizer, out: Path, samples: int = 128, max_tokens: int = 512) -> Path:
    paragraphs = [line.strip() for src in SOURCES
                  for line in (repo / src).read_text(encoding="utf-8").splitlines() if line.strip()]
    lines, current, used = [], [], 0
    # Cycle through the paragraphs when they run out: repeated text is fine for timing a search.
    for paragraph in (paragraphs * (1 + samples * max_tokens // 5000))[: samples * 200]:
        n = len(tokenizer.encode(paragraph + " ", add_special_tokens=False))
        if current and used + n > max_tokens - 8:  # margin: joining can merge tokens differently
            lines.append(" ".join(current))
            current, used = [], 0
            if len(lines) == samples:
                break
        if n <= max_tokens - 8:
            current.append(paragraph)
            used += n
    if current and len(lines) < samples:
        lines.append(" ".join(current))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out

"""The configuration file: typed, validated, one-line errors, command-line overrides."""

import subprocess
import sys

import pytest

from tasks.config import load_config
from tasks.errors import PipelineError
from tasks.stages import BY_NAME, config_fingerprint

from conftest import REPO, make_project


def write(tmp_path, text):
    path = tmp_path / "pipeline.toml"
    path.write_text(text)
    return path


def test_shipped_config_is_valid_and_uses_the_tiny_profile():
    cfg = load_config(REPO / "pipeline.toml")
    assert cfg.model.profile == "tiny"
    assert cfg.model.hub_source is None
    assert cfg.quantize.bits == 4 and cfg.quantize.group_size == 128
    assert cfg.finetune.max_steps == 100


def test_unknown_key_is_named_with_its_section_and_the_closest_real_key(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown key 'finetune.rnak'; did you mean 'finetune.rank'\?"):
        load_config(write(tmp_path, "[finetune]\nrnak = 4\n"))
    # The key renamed when export learnt several targets points to its successor.
    with pytest.raises(PipelineError, match=r"unknown key 'export.target'; did you mean 'export.targets'\?"):
        load_config(write(tmp_path, '[export]\ntarget = "cuda"\n'))
    with pytest.raises(PipelineError, match=r"unknown key 'bogus'; remove it"):
        load_config(write(tmp_path, "bogus = 1\n"))


def test_bad_value_is_named(tmp_path):
    with pytest.raises(PipelineError, match=r"quantize.group_size"):
        load_config(write(tmp_path, "[quantize]\ngroup_size = 100\n"))


def test_unknown_profile_lists_the_known_ones(tmp_path):
    with pytest.raises(PipelineError, match=r"unknown profile 'phi-9'.*tiny.*phi-3.5-mini"):
        load_config(write(tmp_path, '[model]\nprofile = "phi-9"\n'))


def test_revision_must_be_a_full_commit(tmp_path):
    with pytest.raises(PipelineError, match=r"not a 40-hex commit"):
        load_config(write(tmp_path, '[model]\nprofile = "hub"\nrepo_id = "a/b"\nrevision = "main"\n'))


def test_phi_profile_pins_a_commit(tmp_path):
    cfg = load_config(write(tmp_path, '[model]\nprofile = "phi-3.5-mini"\n'))
    repo_id, revision = cfg.model.hub_source
    assert repo_id == "microsoft/Phi-3.5-mini-instruct"
    assert len(revision) == 40 and int(revision, 16) >= 0


def test_template_must_contain_prompt_and_response(tmp_path):
    with pytest.raises(PipelineError, match=r"\{response\}"):
        load_config(write(tmp_path, '[data]\ntemplate = "<|user|>{prompt}"\n'))


def test_broken_toml_is_one_line(tmp_path):
    with pytest.raises(PipelineError, match=r"not valid TOML") as info:
        load_config(write(tmp_path, "[finetune\n"))
    assert "\n" not in str(info.value)


def test_missing_config_file_says_how_to_pass_one(tmp_path):
    with pytest.raises(PipelineError, match=r"config=PATH"):
        load_config(tmp_path / "nope.toml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "")
    cfg = load_config(path, ["finetune.rank=16", "build.dir=build/r16", 'finetune.target_modules=["o_proj"]'])
    assert cfg.finetune.rank == 16 and cfg.build.dir == "build/r16"
    assert cfg.finetune.target_modules == ("o_proj",)
    with pytest.raises(PipelineError, match=r"finetune.rank"):
        load_config(path, ["finetune.rank=lots"])
    with pytest.raises(PipelineError, match=r"KEY=VALUE"):
        load_config(path, ["finetune.rank"])


def test_each_stage_fingerprints_only_the_sections_it_reads(tmp_path):
    path = write(tmp_path, "")
    a, b = load_config(path), load_config(path, ["finetune.rank=4"])
    changed = [name for name, stage in BY_NAME.items() if config_fingerprint(a, stage) != config_fingerprint(b, stage)]
    assert changed == ["finetune"]
    c = load_config(path, ["quantize.group_size=64"])
    assert [n for n, s in BY_NAME.items() if config_fingerprint(a, s) != config_fingerprint(c, s)] == ["quantize"]


def test_shape_profile_has_phi35_minis_exact_sizes_and_the_tiny_profiles_other_fields(tmp_path):
    cfg = load_config(write(tmp_path, '[model]\nprofile = "phi-3.5-mini-shape"\n'))
    spec = cfg.model.random_spec
    assert (spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers, spec.num_attention_heads, spec.vocab_size) \
        == (3072, 8192, 32, 32, 32064)
    assert cfg.model.hub_source is None and spec.tokenizer_corpus == cfg.model.tiny.tokenizer_corpus


def test_export_targets_must_be_known_and_unique(tmp_path):
    assert load_config(write(tmp_path, '[export]\ntargets = ["cuda", "cpu"]\n')).export.targets == ("cuda", "cpu")
    with pytest.raises(PipelineError, match=r"export.targets"):
        load_config(write(tmp_path, '[export]\ntargets = ["cpu", "cpu"]\n'))
    with pytest.raises(PipelineError, match=r"export.targets"):
        load_config(write(tmp_path, '[export]\ntargets = ["tpu"]\n'))


def test_a_stray_brace_in_the_template_is_one_config_line(tmp_path):
    path = write(tmp_path, "")
    for template, problem in [("<|user|>{prompt}}{response}", r"the '\}' at character 17 closes no field"),
                              ("{prompt {response}", r"the '\{' at character 1 opens no field")]:
        with pytest.raises(PipelineError, match=rf"^command line \(data.template=\.\.\.\): data.template: {problem}; .*write a literal brace as "
                                                r"\{\{ or \}\}$"):
            load_config(path, [f"data.template={template!r}"])
    with pytest.raises(PipelineError, match=r"adapters.x.template: the '\}' at character 9 closes no field"):
        load_config(path, ['adapters.x.path="data/travel_qa.jsonl"', 'adapters.x.template="{prompt}}{response}"'])


def test_the_template_takes_prompt_then_response_each_once(tmp_path):
    path = write(tmp_path, "")
    for template in ("{response} {prompt}", "{prompt} {prompt} {response}"):
        with pytest.raises(PipelineError, match=r"data.template: the template's fields are .*; a template is text with "
                                                r"\{prompt\} and then \{response\}, each once"):
            load_config(path, [f"data.template={template!r}"])


def test_a_boolean_is_not_an_integer(tmp_path):
    path = write(tmp_path, "[finetune]\nrank = true\n")
    with pytest.raises(PipelineError, match=rf"^{path}: finetune.rank: must be an integer, not true$"):
        load_config(path)
    with pytest.raises(PipelineError, match=r"finetune.alpha: must be a number, not true"):
        load_config(write(tmp_path, ""), ["finetune.alpha=true"])


def test_a_float_is_not_an_integer_even_a_whole_one(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(PipelineError, match=r"finetune.max_steps: must be an integer, not 1e\+23"):
        load_config(path, ["finetune.max_steps=1e23"])
    with pytest.raises(PipelineError, match=r"finetune.rank: must be an integer, not 16.0"):
        load_config(path, ["finetune.rank=16.0"])


def test_an_integer_is_a_valid_float(tmp_path):
    cfg = load_config(write(tmp_path, ""), ["finetune.alpha=32", "cache.max_size_gb=2"])
    assert cfg.finetune.alpha == 32.0 and isinstance(cfg.finetune.alpha, float) and cfg.cache.max_size_gb == 2.0


@pytest.mark.parametrize("value", ["inf", "-inf", "nan"])
def test_infinite_learning_rate_is_refused(tmp_path, value):
    with pytest.raises(PipelineError, match=rf"finetune.learning_rate: must be a finite number, not {value}$"):
        load_config(write(tmp_path, ""), [f"finetune.learning_rate={value}"])


@pytest.mark.parametrize("override, message", [
    ("finetune.max_steps=10000000", r"finetune.max_steps: must be at most 1,000,000; a million optimizer steps"),
    ("evaluate.max_new_tokens=1000000000000", r"evaluate.max_new_tokens: must be at most 4,096; Phi-3.5's original "
                                              r"context is 4,096 positions"),
    ("finetune.learning_rate=3", r"finetune.learning_rate: must be at most 1.0; training diverges"),
    ("finetune.max_seq_len=1000000", r"finetune.max_seq_len: must be at most 131,072; Phi-3.5's context"),
])
def test_absurd_max_steps_is_refused_with_the_reason(tmp_path, override, message):
    with pytest.raises(PipelineError, match=message):
        load_config(write(tmp_path, ""), [override])


def test_a_bad_value_fails_the_check_in_one_line_with_exit_code_2(tmp_path):
    project = make_project(tmp_path / "project")
    result = subprocess.run([sys.executable, "-m", "tasks", "check", "--set", "finetune.rank=true"], cwd=project,
                            capture_output=True, text=True, timeout=120)
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == "error: command line (finetune.rank=...): finetune.rank: must be an integer, not true\n"


def test_the_configuration_reference_is_generated_from_the_models_and_current():
    from tasks.config_doc import fields, generated_part, reference

    undocumented = [key for key, _, doc in fields() if not doc]
    assert undocumented == [], f"give these fields a docstring in tasks/config.py: {undocumented}"
    assert generated_part() == reference(), "docs/configuration.md is stale: run python -m tasks.config_doc --write"


def test_the_shipped_config_sets_nothing_the_defaults_already_say(tmp_path):
    """One source of defaults: pipeline.toml only changes values, so it never contradicts config.py."""
    import tomllib

    from tasks.config import PipelineConfig
    from tasks.config_doc import _lookup, fields

    shipped = tomllib.loads((REPO / "pipeline.toml").read_text(encoding="utf-8"))
    defaults = PipelineConfig().model_dump(mode="json")
    restated = [key for key, _, _ in fields() if _lookup(shipped, key)[0]
                and _lookup(shipped, key)[1] == _lookup(defaults, key)[1] and key != "build.dir"]
    assert restated == []


def test_config_command_says_where_each_value_comes_from(tmp_path):
    import subprocess
    import sys

    (tmp_path / "pipeline.toml").write_text('[finetune]\nrank = 4\n')
    result = subprocess.run([sys.executable, "-m", "tasks", "config", "--root", str(tmp_path), "--set",
                             "finetune.alpha=8"], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert lines["finetune.rank"].endswith("4  (pipeline.toml)")
    assert lines["finetune.alpha"].endswith("8.0  (command line)")
    assert lines["finetune.learning_rate"].endswith("0.002  (default)")


@pytest.mark.parametrize("args, expected", [
    (["rank=16"], "error: command line: rank=16 is not a config key; config keys have a section: did you mean finetune.rank?"),
    (["finetune.rank=abc"], 'error: command line (finetune.rank=...): finetune.rank: must be an integer, not "abc"'),
    (["finetune.target_modules=o_proj"], "write a list, e.g. finetune.target_modules="),
])
def test_command_line_mistakes_are_one_line_that_blames_the_command_line(tmp_path, args, expected):
    import os

    project = make_project(tmp_path / "project")
    result = subprocess.run([sys.executable, "-m", "doit", *args], cwd=project, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode != 0 and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "pipeline.toml" not in result.stderr
    assert not (project / "build").exists()


def test_a_merged_export_fingerprints_the_quantize_settings_it_repeats(tmp_path):
    path = write(tmp_path, "")
    switchable, merged = load_config(path), load_config(path, ["export.adapter_mode=merged"])
    export = BY_NAME["export"]
    assert config_fingerprint(switchable, export) == config_fingerprint(load_config(path, ["quantize.calibration_samples=64"]), export)
    changed = load_config(path, ["export.adapter_mode=merged", "quantize.calibration_samples=64"])
    assert config_fingerprint(merged, export) != config_fingerprint(changed, export)
    assert export.files(merged) == ["data/calibration.txt"] and export.files(switchable) == []

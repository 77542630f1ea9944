"""The stage specs: each declared once in its own module, read by everything, code read off the imports."""

import ast

from tasks.stages import COMMON_CODE, STAGE_MODULES, STAGES, code_of, stages_for
from tasks.config import load_config

from conftest import REPO



def test_a_stage_depends_on_exactly_the_code_its_entry_imports():
    # finetune reaches its distributed path, export the float twin; nothing reaches another stage
    finetune = {s.name: s for s in STAGES}["finetune"]
    assert "tasks/awq_twin.py" in finetune.code and "tasks/progress.py" in finetune.code
    for stage in STAGES:
        others = {m.replace(".", "/") + ".py" for m in STAGE_MODULES} - {stage.entry.partition(":")[0].replace(".", "/") + ".py"}
        assert not others & set(stage.code), f"{stage.name} imports another stage: {others & set(stage.code)}"
        assert not others & set(COMMON_CODE)


def test_no_module_of_the_project_branches_on_a_stage_name():
    """Runner, disk, GPU slots, Ray executor and run cache read the specs; only a stage's module names it."""
    for module in ("runner", "disk", "gpu_slots", "ray_executor", "run_cache"):
        tree = ast.parse((REPO / "tasks" / f"{module}.py").read_text())
        compared = [node for node in ast.walk(tree) if isinstance(node, ast.Compare)
                    and any(isinstance(c, ast.Constant) and c.value in {s.name for s in STAGES}
                            for c in [node.left, *node.comparators])]
        assert compared == [], f"tasks/{module}.py compares with a stage name at line {compared[0].lineno}"


def test_each_stage_is_declared_in_its_own_module_and_listed_once():
    """Adding a stage is its module (entry and STAGE) plus one line in STAGE_MODULES."""
    import importlib

    assert [s.entry.partition(":")[0] for s in STAGES] == list(STAGE_MODULES)
    for module in STAGE_MODULES:
        assert importlib.import_module(module).STAGE in STAGES
    assert len({s.name for s in STAGES}) == len(STAGES)


def test_every_stage_entry_exists_and_an_adapter_stage_reuses_its_core_stages_spec():
    import importlib

    cfg = load_config(REPO / "pipeline.toml", ["adapters.legal.path=data/travel_qa.jsonl"])
    for stage in stages_for(cfg):
        module, _, function = stage.entry.partition(":")
        assert callable(getattr(importlib.import_module(module), function)), stage.entry
    by_name = {s.name: s for s in stages_for(cfg)}
    assert by_name["finetune_legal"].code == by_name["finetune"].code
    assert by_name["finetune_legal"].entry_args == ("legal",)
    assert "finetune_legal" in by_name["evaluate"].upstream and "adapter_legal" in by_name["evaluate"].upstream


def test_code_of_follows_imports_inside_functions_too():
    assert "tasks/devices.py" in code_of("tasks.finetune")  # imported inside train()
    assert not {"tasks/finetune.py", "tasks/export.py"} & set(code_of("tasks.quantize"))


def test_file_folder_and_environment_names_are_spelled_only_in_tasks_paths():
    """The build's own names (the manifest, the staging folder, doit's database, PIPELINE_* variables)
    are constants of tasks/paths.py; everything else imports them."""
    import re

    own = {"MANIFEST.json", ".staging", ".doit.sqlite3", "fetched"}
    files = [p for p in (REPO / "tasks").glob("*.py") if p.name != "paths.py"]
    files += [REPO / "dodo.py", *(REPO / "tools").glob("*.py"), *(REPO / "bench").glob("*.py")]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in own and not re.fullmatch(r"PIPELINE_[A-Z_]+", node.value), \
                    f"{path.relative_to(REPO)}:{node.lineno} spells {node.value!r}; import it from tasks/paths.py"


def test_the_image_tool_imports_with_the_standard_library_alone():
    """`python3 -m tasks.image` runs on hosts without the project's venv (docs/CONTAINER.md)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); import tasks.image"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

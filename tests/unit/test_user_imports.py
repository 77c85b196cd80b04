"""The imports= key: a router or task module of the user's, written outside the package, used by name through
compose_config, ldmole-train and the sweep's dry run, recorded in config.yaml but imported on reading it back
only through LDMOLE_IMPORTS; and scripts/train.py as ldmole-train."""

from __future__ import annotations

import io
import sys

import pytest
import yaml

from ldmole.cli import sweep
from ldmole.core.routers import router_names
from ldmole.experiment.data import TASKS
from ldmole.experiment.run_config import RunConfig, compose_config, import_modules
from tests.helpers import REPO_ROOT

TINY = ["model=tiny_qwen3", "task=arc_c"]


@pytest.fixture(autouse=True)
def restore_registries():
    """The routers and tasks a test's modules register are gone after it (other tests list the registries)."""
    from ldmole.core.routers import registry

    routers, tasks = dict(registry._REGISTRY), dict(TASKS)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(routers)
    TASKS.clear()
    TASKS.update(tasks)


def write_router(folder, name: str) -> str:
    """A module registering a top-1-of-sigmoid router called ``name``, as a user writes it; returns its path."""
    path = folder / f"{name}_routers.py"
    path.write_text(f'''
import torch
from ldmole import Router, register_router


@register_router
class SigmoidTop1Router(Router):
    """The top-scoring expert only, weighted by the sigmoid of its score."""

    name = "{name}"
    aux_losses = frozenset({{"lb", "z"}})

    @classmethod
    def route_scores(cls, scores, *, top_k=2, lam=None):
        top = scores.argmax(-1, keepdim=True)
        return torch.zeros_like(scores).scatter(-1, top, torch.sigmoid(scores.gather(-1, top)))
''')
    return str(path)


def write_task(folder, name: str) -> str:
    """A module registering ``name``, a copy of ARC-Easy under another name; returns its path."""
    path = folder / f"{name}_tasks.py"
    path.write_text(f'''
import dataclasses
from ldmole.experiment.data import get_task, register_task

register_task(dataclasses.replace(get_task("arc_e"), name="{name}"))
''')
    return str(path)


def test_a_router_module_named_in_imports_can_be_used_and_is_recorded(tmp_path):
    module = write_router(tmp_path, "user_top1_a")
    assert "user_top1_a" not in router_names()
    config = compose_config([*TINY, "method=softmax", "mole.router=user_top1_a", f"imports=[{module}]"])
    assert config.mole.router == "user_top1_a" and config.imports == [module]
    saved = yaml.safe_load(yaml.safe_dump(config.to_flat(), sort_keys=False))
    assert saved["imports"] == [module], "config.yaml records the imports"
    assert RunConfig.from_flat(saved) == config, "read back in a process where the router is registered"


def test_reading_a_saved_config_back_never_runs_the_modules_it_names(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    module = tmp_path / "user_top1_h_routers.py"
    module.write_text(f"open({str(marker)!r}, 'w').close()\n" + open(write_router(tmp_path, "user_top1_h")).read())
    saved = compose_config([*TINY, "method=softmax", "mole.router=sparsegen"]).to_flat()
    saved.update(imports=[str(module)], mole={**saved["mole"], "router": "user_top1_h"})
    with pytest.raises(ValueError) as error:
        RunConfig.from_flat(yaml.safe_load(yaml.safe_dump(saved)))
    assert not marker.exists(), "a config.yaml read back must not import (run) the modules it names"
    assert "router='user_top1_h' is unknown" in str(error.value)
    assert f"LDMOLE_IMPORTS={module} does" in str(error.value), "the error says how to import them"
    monkeypatch.setenv("LDMOLE_IMPORTS", str(module))
    assert RunConfig.from_flat(saved).mole.router == "user_top1_h" and marker.exists()


def test_without_imports_the_router_is_an_early_named_error(tmp_path):
    with pytest.raises(ValueError, match="router='user_top1_missing' is unknown"):
        compose_config([*TINY, "method=softmax", "mole.router=user_top1_missing"])


def test_a_single_entry_needs_no_brackets_and_importing_twice_runs_the_module_once(tmp_path):
    module = write_router(tmp_path, "user_top1_b")
    first = compose_config([*TINY, "method=softmax", "mole.router=user_top1_b", f"imports={module}"])
    second = compose_config([*TINY, "method=softmax", "mole.router=user_top1_b", f"imports={module}"])
    assert first.imports == second.imports == [module], "the second import must not register the router again"


def test_a_method_file_may_carry_its_import_and_lists_add_up(tmp_path):
    module = write_router(tmp_path, "user_top1_c")
    other = write_router(tmp_path, "user_top1_d")
    configs = tmp_path / "configs"
    (configs / "models").mkdir(parents=True)
    (configs / "methods").mkdir()
    (configs / "models" / "tiny_qwen3.yaml").write_text((REPO_ROOT / "configs/models/tiny_qwen3.yaml").read_text())
    (configs / "methods" / "top1.yaml").write_text(
        f"imports: [{module}]\nmole: {{router: user_top1_c, num_experts: 4, r: 4, alpha: 8}}\nlb_coef: 1.0\n")
    config = compose_config(["model=tiny_qwen3", "method=top1", f"imports=[{other}]"], config_dir=configs)
    assert config.mole.router == "user_top1_c"
    assert config.imports == [module, other], "the method file's imports come first, the command line's after"


def test_a_relative_file_is_found_from_the_current_folder(tmp_path, monkeypatch):
    write_router(tmp_path, "user_top1_e")
    monkeypatch.chdir(tmp_path)
    config = compose_config([*TINY, "method=softmax", "mole.router=user_top1_e", "imports=[user_top1_e_routers.py]"])
    assert config.imports == ["user_top1_e_routers.py"]


def test_a_task_module_named_in_imports_can_be_selected(tmp_path):
    module = write_task(tmp_path, "user_arc_e")
    assert "user_arc_e" not in TASKS
    config = compose_config(["model=tiny_qwen3", "task=user_arc_e", f"imports=[{module}]"])
    assert config.task == "user_arc_e" and config.output_dir == "runs/tiny_qwen3/user_arc_e/ldmole/seed42"


@pytest.mark.parametrize("entry, message", [
    ("no_such_module_xyz", "imports: no module 'no_such_module_xyz': give its file instead"),
    ("missing_file.py", "imports: no file 'missing_file.py' (looked in"),
])
def test_a_module_that_cannot_be_found_is_a_named_error(entry, message):
    with pytest.raises(ValueError, match="set in the command line") as error:
        compose_config([*TINY, f"imports=[{entry}]"])
    assert message in str(error.value)


def test_a_module_that_fails_while_importing_names_itself_and_the_error(tmp_path):
    broken = tmp_path / "broken_routers.py"
    broken.write_text("raise RuntimeError('half written')\n")
    with pytest.raises(ValueError, match=r"importing '.*broken_routers.py' failed: RuntimeError: half written"):
        import_modules([str(broken)])
    assert not any(name.startswith("ldmole_imports_broken_routers") for name in sys.modules), \
        "a failed import must not leave a half-made module behind"


def test_the_sweep_dry_run_composes_every_point_with_the_users_router_and_task(tmp_path):
    router = write_router(tmp_path, "user_top1_f")
    task = write_task(tmp_path, "user_arc_e_sweep")
    out = io.StringIO()
    status = sweep.main(["--models", "tiny_qwen3", "--tasks", "user_arc_e_sweep", "--methods", "softmax",
                         "--seeds", "1,2", "--root", str(tmp_path / "runs"), "--dry-run",
                         f"imports=[{router}, {task}]", "mole.router=user_top1_f"], out=out)
    assert status == 0, out.getvalue()
    lines = [line for line in out.getvalue().splitlines() if "run.sh" in line]
    assert len(lines) == 2 and all("mole.router=user_top1_f" in line and router in line for line in lines)


def test_the_sweep_refuses_an_unknown_router_before_anything_runs(tmp_path, capsys):
    status = sweep.main(["--models", "tiny_qwen3", "--tasks", "arc_c", "--methods", "softmax", "--dry-run",
                         "--root", str(tmp_path), "mole.router=user_top1_nowhere"], out=io.StringIO())
    assert status == 2 and "user_top1_nowhere" in capsys.readouterr().err

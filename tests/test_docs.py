"""The README's plain-PyTorch example runs as written.

The docstring examples of every module are collected by pytest itself
(``--doctest-modules`` over ``src/layerfreeze``, set in pyproject.toml), not from a list.
"""

import pathlib
import re
import runpy

ROOT = pathlib.Path(__file__).resolve().parents[1]


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

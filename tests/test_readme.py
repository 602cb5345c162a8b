"""Every ```python block of the README runs, in order, in one namespace: the documentation cannot rot."""

import re
from pathlib import Path

import matplotlib

import vinn

matplotlib.use("Agg")  # a block that plots must not need a display

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_code():
    assert len(BLOCKS) >= 4


def test_readme_code_blocks_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks that write files write them here
    namespace = {"__name__": "readme"}
    try:
        for number, block in enumerate(BLOCKS, 1):
            try:
                exec(compile(block, f"README.md block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"README.md code block {number} failed: {error!r}\n{block}") from error
    finally:
        # a block registers a layer type of its own: gone for the tests after this one, while the
        # types vinn registers once a block imports their library (transformers, timm) stay, as
        # vinn registers them only once
        for torch_type, vinn_type in list(vinn.layers._REGISTRY.items()):
            if vinn_type.__module__ == "readme":
                del vinn.layers._REGISTRY[torch_type]

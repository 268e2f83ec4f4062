"""The docs' examples run: every ```python block of docs/*.md is executed, the blocks of one
page in order in a shared namespace (a page reads as one script).

Write snippets that are not meant to run (signatures, shell commands) as ```text or
```bash blocks.
"""

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```\s*$", re.DOTALL | re.MULTILINE)


def python_blocks(page: Path) -> list[str]:
    return PYTHON_BLOCK.findall(page.read_text())


def test_docs_have_runnable_examples():
    for name in ("gluonts.md", "sktime.md", "pandas-polars.md"):
        assert python_blocks(DOCS / name), f"docs/{name} has no ```python example"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)], ids=lambda p: p.name)
def test_examples_run(page, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    code = "".join(python_blocks(page))
    if any(f'load_dataset("{name}")' in code for name in ("m4_hourly", "etth1", "exchange_rate")):
        from conftest import SHARED_DATA
        if not SHARED_DATA.is_dir():
            pytest.skip(f"{page.name} reads the benchmark files; {SHARED_DATA} is missing")
    namespace = {"__name__": f"docs.{page.stem}"}
    for i, block in enumerate(python_blocks(page)):
        code = compile(block, f"{page.name} [python block {i + 1}]", "exec")
        exec(code, namespace)  # noqa: S102 - running our own documentation

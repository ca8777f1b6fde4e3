"""The README's Python blocks run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python blocks"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {})
    printed = capsys.readouterr().out.splitlines()
    # The values the README shows in comments are the values printed.
    shown = re.findall(r"print\(.*?\)\s+# (.*)", "\n".join(blocks))
    assert printed == shown

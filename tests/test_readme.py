"""The README is a spec: every Python block runs verbatim, and the Quickstart is two commands.

Each ```python block runs on its own, in a fresh interpreter (this one's, so the package
is imported as installed) with an empty temporary directory as its working directory.
A block right after ``<!-- not-tested: reason -->`` is skipped; keep that for blocks that
need a GPU, the network or minutes of time. Bash blocks are never run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

QUICKSTART = [  # the two commands, comments and alignment included
    'pip install -e ".[dev]" && python -m policycascade.train --alpha 1e-3'
    "   # train + test-split table",
    'pip install -e ".[dev]" && pytest'
    "                                      # the test suite (CI runs this)",
]

_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[^\s`]*)")
_NOT_TESTED = re.compile(r"^\s*<!--\s*not-tested:\s*(?P<reason>.*?)\s*-->\s*$")


@dataclass
class CodeBlock:
    """One fenced code block of a Markdown text."""

    lang: str  # info string's first word, lower-case ("" when none)
    code: str
    line: int  # 1-based line of the opening fence
    section: str  # text of the nearest heading above it ("" before any)
    skip_reason: str | None  # reason of a <!-- not-tested: ... --> right before the fence


def extract_code_blocks(markdown: str) -> list[CodeBlock]:
    """Fenced code blocks in document order.

    A fence is three or more backticks or tildes, indented by at most three spaces; the
    block ends at a fence of the same character at least as long. The opening fence's
    indentation is removed from the block's lines, as CommonMark does. The last non-blank
    line before the fence decides whether the block is marked not-tested.
    """
    blocks: list[CodeBlock] = []
    lines = markdown.splitlines()
    section = ""
    i = 0
    while i < len(lines):
        line = lines[i]
        match = _FENCE.match(line)
        if match is None:
            if re.match(r"^ {0,3}#{1,6}\s", line):
                section = line.strip().lstrip("#").strip()
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = _NOT_TESTED.match(previous)
        body = []
        j = i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing is not None
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["lang"]
            ):
                break
            text = lines[j]
            strip = min(indent, len(text) - len(text.lstrip(" ")))
            body.append(text[strip:])
            j += 1
        blocks.append(
            CodeBlock(
                lang=match["lang"].lower(),
                code="\n".join(body) + "\n",
                line=i + 1,
                section=section,
                skip_reason=marker["reason"] if marker else None,
            )
        )
        i = j + 1
    return blocks


def test_extractor_on_a_hand_written_markdown():
    text = "\n".join(
        [
            "# Title",
            "```bash",
            "echo hi",
            "```",
            "## Use",
            "```python",
            "import os",
            "",
            "print(os.sep)",
            "```",
            "<!-- not-tested: needs a GPU -->",
            "",
            "```python",
            "import torch; torch.zeros(1, device='cuda')",
            "```",
            "- a list item:",
            "  ```python",
            "  x = 1",
            "  if x:",
            "      print(x)",
            "  ```",
            "````markdown",
            "```python",
            "not a block of its own",
            "```",
            "````",
            "```",
            "plain",
            "```",
        ]
    )
    blocks = extract_code_blocks(text)
    assert [b.lang for b in blocks] == ["bash", "python", "python", "python", "markdown", ""]
    assert blocks[0].code == "echo hi\n" and blocks[0].section == "Title"
    assert blocks[1].code == "import os\n\nprint(os.sep)\n"
    assert blocks[1].section == "Use" and blocks[1].line == 6 and blocks[1].skip_reason is None
    assert blocks[2].skip_reason == "needs a GPU"
    assert blocks[3].code == "x = 1\nif x:\n    print(x)\n" and blocks[3].skip_reason is None
    assert blocks[4].code == "```python\nnot a block of its own\n```\n"
    assert blocks[5].code == "plain\n"


def _readme_blocks() -> list[CodeBlock]:
    return extract_code_blocks(README.read_text(encoding="utf-8"))


def _python_blocks() -> list[CodeBlock]:
    return [b for b in _readme_blocks() if b.lang == "python"]


def test_readme_has_python_blocks():
    assert _python_blocks(), "README.md has no ```python block to test"


def test_quickstart_is_exactly_the_two_commands():
    quickstart = [b for b in _readme_blocks() if b.section == "Quickstart"]
    assert len(quickstart) == 1 and quickstart[0].lang == "bash"
    lines = [line.rstrip() for line in quickstart[0].code.splitlines() if line.strip()]
    assert lines == QUICKSTART


def _block_id(block: CodeBlock) -> str:
    return f"line{block.line}-" + re.sub(r"\W+", "-", block.section).strip("-")


@pytest.mark.parametrize("block", _python_blocks(), ids=_block_id)
def test_readme_python_block_runs(block: CodeBlock, tmp_path: Path):
    if block.skip_reason is not None:
        pytest.skip(f"not-tested: {block.skip_reason}")
    script = tmp_path / "readme_block.py"
    script.write_text(block.code, encoding="utf-8")
    env = {**os.environ, "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)  # the package as installed, not the checkout on the path
    result = subprocess.run(
        [sys.executable, script.name],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"README.md block at line {block.line} ({block.section}) failed with status "
        f"{result.returncode}:\n{result.stderr[-4000:]}"
    )

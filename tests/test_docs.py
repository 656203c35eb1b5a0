"""The docs' examples run: every runnable ```` ```python ```` block of the pages below.

Pages: ``docs/index.md``, ``docs/quickstart.md``, ``docs/migrating.md``, ``docs/concepts/*.md``.
A ```` ```python ```` fence (indented too, inside tabs and admonitions) is an example. The
extractor skips it when the nearest non-blank line above it is ``<!-- no-run -->``. Such
examples need a real bucket, a process group or names the page leaves to the reader.

The runnable examples of one page run in order, as one script, in a fresh interpreter whose
working directory is an empty temporary directory (``XDG_CACHE_HOME`` points there too, so a
default cache directory stays inside it). An example may use what an earlier example of the
same page defined, as a reader would. Each example sits at its own line number in the script,
named after the page, so a traceback points at the line of the ``.md`` file.

Warnings are errors in the script, as in the test suite. The script also fails if it prints
``Exception ignored in`` (a resource or thread error hidden by the interpreter).

A page whose runnable examples use torch (``StreamingWebDataset``, ``StreamingDataLoader``,
``gather_state_dict`` or ``torch``) runs in :func:`test_torch_page`, marked ``torch``, which
runs in the py311-torch environment. The other pages run in :func:`test_page`, in every
environment.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(
    [DOCS / "index.md", DOCS / "quickstart.md", DOCS / "migrating.md", *DOCS.glob("concepts/*.md")]
)
NO_RUN = "<!-- no-run -->"
TIMEOUT = 240

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<ticks>`{3,}|~{3,})(?P<info>[^`]*)$")
_TORCH = re.compile(r"\b(StreamingWebDataset|StreamingDataLoader|gather_state_dict|torch)\b")
# Warnings the test suite ignores too (pyproject.toml): on machines with fewer CPUs than the
# examples' num_workers, torch warns about the worker count.
_WARNING_FILTERS = ["error", "ignore:This DataLoader will create:UserWarning"]


@dataclass(frozen=True)
class Example:
    """One fenced ```` ```python ```` block of a page."""

    page: Path
    line: int  # 1-based line of the block's first code line in the page
    code: str  # dedented
    run: bool


def examples(page: Path) -> list[Example]:
    """The ```` ```python ```` blocks of ``page``, in order.

    Raises:
        ValueError: A fence is not closed, or ``<!-- no-run -->`` is not followed by a
            ```` ```python ```` block.
    """
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Example] = []
    previous = ""  # the nearest non-blank line above the current one, stripped
    previous_line = 0
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if match is None:
            if lines[i].strip():
                if previous == NO_RUN:
                    raise ValueError(
                        f"{page}:{previous_line}: {NO_RUN} must be followed by a ```python block"
                    )
                previous, previous_line = lines[i].strip(), i + 1
            i += 1
            continue
        indent, ticks, info = match["indent"], match["ticks"], match["info"].strip()
        end = i + 1
        while end < len(lines) and lines[end].strip() != ticks:
            end += 1
        if end == len(lines):
            raise ValueError(f"{page}:{i + 1}: unclosed code fence")
        body = [
            line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]
        ]
        if info == "python":
            code = textwrap.dedent("\n".join(body))
            found.append(Example(page, i + 2, code, run=previous != NO_RUN))
        elif previous == NO_RUN:
            raise ValueError(
                f"{page}:{previous_line}: {NO_RUN} is followed by ```{info}, not ```python"
            )
        previous, previous_line = ticks, end + 1
        i = end + 1
    return found


def script(page: Path) -> str:
    """The page's runnable examples as one script, each at its line number in the page."""
    out: list[str] = []
    for example in examples(page):
        if not example.run:
            continue
        out.extend([""] * (example.line - 1 - len(out)))
        out.extend(example.code.splitlines())
    return "\n".join(out) + "\n"


def needs_torch(page: Path) -> bool:
    return bool(_TORCH.search(script(page)))


def run_page(page: Path, tmp_path: Path) -> None:
    relative = page.relative_to(ROOT)
    path = tmp_path / "examples" / f"{relative}.py"  # tracebacks name the page
    path.parent.mkdir(parents=True)
    path.write_text(script(page), encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
        "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
    }
    proc = subprocess.run(
        [sys.executable, *(f"-W{f}" for f in _WARNING_FILTERS), str(path)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    report = f"{relative} examples failed (exit {proc.returncode})\n{proc.stdout}\n{proc.stderr}"
    assert proc.returncode == 0, report
    assert "Exception ignored in" not in proc.stderr, report


def _pages(torch: bool) -> list[Any]:
    return [
        pytest.param(page, id=str(page.relative_to(DOCS)))
        for page in PAGES
        if any(e.run for e in examples(page)) and needs_torch(page) == torch
    ]


@pytest.mark.parametrize("page", _pages(torch=False))
def test_page(page: Path, tmp_path: Path) -> None:
    """The page's examples run without torch."""
    run_page(page, tmp_path)


@pytest.mark.torch
@pytest.mark.parametrize("page", _pages(torch=True))
def test_torch_page(page: Path, tmp_path: Path) -> None:
    """The page's examples, which use torch, run."""
    run_page(page, tmp_path)


def test_every_page_has_runnable_examples() -> None:
    """The extractor finds examples on every page (a broken one would skip them silently)."""
    assert PAGES, "no pages found"
    empty = [
        str(page.relative_to(DOCS)) for page in PAGES if not any(e.run for e in examples(page))
    ]
    assert not empty, f"pages without a runnable example: {empty}"


def test_extractor(tmp_path: Path) -> None:
    """Indented fences, no-run markers, line numbers and misplaced markers."""
    page = tmp_path / "page.md"
    page.write_text(
        "# T\n\n```python\na = 1\n```\n\n<!-- no-run -->\n```python\nb = 2\n```\n\n"
        '=== "Tab"\n\n    ```python\n    if a:\n        c = 3\n    ```\n',
        encoding="utf-8",
    )
    found = examples(page)
    assert [(e.line, e.code, e.run) for e in found] == [
        (4, "a = 1", True),
        (9, "b = 2", False),
        (15, "if a:\n    c = 3", True),
    ]
    assert script(page).splitlines()[14] == "if a:"
    page.write_text("<!-- no-run -->\nsome text\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be followed"):
        examples(page)
    page.write_text("<!-- no-run -->\n```bash\nls\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not ```python"):
        examples(page)

"""A griffe extension for the API reference: the reST idioms of wdsfs docstrings, as Markdown.

The docstrings are Google style but use a few reST habits that Markdown (and so mkdocstrings)
would print literally. Before rendering, this extension rewrites, in every docstring:

- roles: ``:class:`~wdsfs.cache.ShardCache``` -> `` `ShardCache` ``,
  ``:func:`wdsfs.tar.read_samples``` -> `` `wdsfs.tar.read_samples` `` (``~`` keeps the last
  name, as in Sphinx);
- a paragraph ending in ``::`` before an indented literal block: the ``::`` becomes ``:`` (the
  indented block is already a Markdown code block);
- a title underlined with dashes (``The model`` / ``---------``): a bold line, not a heading
  that would compete with the page's own headings;
- simple tables (``====  ====`` borders): a Markdown table.

The docstrings themselves are not changed; only what the reference pages show.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(
    r":(?:class|func|meth|attr|data|mod|obj|exc|const):`(~?)([^`<]+?)(?:\s*<([^>]+)>)?`"
)
_BORDER = re.compile(r"^\s*=+(?: +=+)+\s*$")
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")


def _role(match: re.Match[str]) -> str:
    tilde, text, target = match.groups()
    if target is not None:  # :role:`text <target>`
        return f"`{text.strip()}`"
    name = text.strip()
    if tilde:
        name = name.rsplit(".", 1)[-1]
    return f"`{name}`"


def _starts(border: str) -> list[int]:
    """Where each column of a simple table starts, from a ``====  ====`` border."""
    return [m.start() for m in re.finditer(r"=+", border)]


def _row(line: str, starts: list[int]) -> list[str]:
    """The cells of one table row: the last column runs to the end of the line."""
    ends = [*starts[1:], len(line)]
    return [line[a:b].strip().replace("|", "\\|") for a, b in zip(starts, ends, strict=True)]


def _tables(lines: list[str]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not _BORDER.match(line):
            out.append(line)
            i += 1
            continue
        starts = _starts(line)
        borders = [i]
        j = i + 1
        while j < len(lines) and lines[j].strip() and len(borders) < 3:
            if _BORDER.match(lines[j]):
                borders.append(j)
            j += 1
        if len(borders) != 3:  # not a simple table with a header: leave it
            out.append(line)
            i += 1
            continue
        header = [_row(lines[k], starts) for k in range(borders[0] + 1, borders[1])]
        body = [_row(lines[k], starts) for k in range(borders[1] + 1, borders[2])]
        titles = header[0] if header else [""] * len(starts)
        out.append("| " + " | ".join(titles) + " |")
        out.append("|" + "---|" * len(starts))
        out.extend("| " + " | ".join(cells) + " |" for cells in body)
        i = borders[2] + 1
    return out


def rst_to_markdown(text: str) -> str:
    """Rewrite the reST idioms of one docstring as Markdown (see the module docstring)."""
    text = _ROLE.sub(_role, text)
    lines = text.split("\n")
    out: list[str] = []
    for k, line in enumerate(lines):
        previous = lines[k - 1] if k else ""
        if (
            _UNDERLINE.match(line)
            and previous.strip()
            and len(line.strip()) == len(previous.strip())
            and out
        ):
            out[-1] = f"**{previous.strip()}**"
            continue
        if line.endswith("::") and not line.strip().startswith(">>>"):
            line = line[:-2].rstrip() + ":" if line[:-2].strip() else ""
        out.append(line)
    return "\n".join(_tables(out))


class RstToMarkdown(griffe.Extension):
    """Rewrite every docstring's reST idioms as Markdown before mkdocstrings renders it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)

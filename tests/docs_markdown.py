"""Reading the README and the documentation pages as their tests need: fenced
blocks, the command lines of shell blocks, code spans."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
TEXTS = [README, *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`\n]+)`")


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """Fenced code blocks: (language, body)."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def prose(text: str) -> str:
    return FENCE.sub("", text)


def shell_lines(text: str) -> list[str]:
    """Command lines of the shell blocks, continuation lines joined, prompts dropped."""
    lines = []
    for lang, body in fenced_blocks(text):
        if lang not in ("", "bash", "sh", "console"):
            continue
        joined = re.sub(r"\\\n\s*", " ", body)
        # In a block with prompts, only the lines after "$ " are commands.
        prompted = any(line.startswith("$ ") for line in joined.splitlines())
        # A quoted JSON body may span lines: join lines inside an open quote.
        current = ""
        for line in joined.splitlines():
            if prompted and not current:
                if not line.startswith("$ "):
                    continue
                line = line.removeprefix("$ ")
            line = uncomment(line)
            if not line.strip():
                continue
            current = f"{current} {line}" if current else line
            if current.count("'") % 2 == 0:
                lines.append(current.strip())
                current = ""
        if current:
            lines.append(current.strip())
    return lines


def uncomment(line: str) -> str:
    """The line without a shell comment (a `#` outside single quotes)."""
    for m in re.finditer(r"(?:^|\s)#(?:\s|$)", line):
        if line[: m.start()].count("'") % 2 == 0:
            return line[: m.start()]
    return line


def code_shown(text: str) -> list[str]:
    """Everything shown as code: shell lines and inline code spans of the prose."""
    return shell_lines(text) + SPAN.findall(prose(text))

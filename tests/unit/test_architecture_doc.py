"""docs/architecture.md: every `pd_serve.module:Qualified.name` it cites exists, so the request flow cannot rot."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
SECTION = "## One streamed chat, function by function"
REFERENCE = re.compile(r"`(pd_serve(?:\.\w+)*):(\w+(?:\.\w+)*)`")
# a module named alone; also catches a name written without its colon, which does not import
MODULE = re.compile(r"`(pd_serve(?:\.\w+)+)`")
MIN_NAMES = 25


def _missing(module_path: str, qualname: str) -> str | None:
    """Why `module_path:qualname` (or the module alone, qualname "") does not resolve; None when it does."""
    try:
        obj = importlib.import_module(module_path)
    except ImportError as exc:
        return f"module {module_path} does not import: {exc}"
    for part in qualname.split(".") if qualname else ():
        if not hasattr(obj, part):
            return f"{module_path} has no {qualname} (no {part!r})"
        obj = getattr(obj, part)
    return None


def _section(text: str) -> str:
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:] if end < 0 else text[start:end]


def test_every_cited_name_exists() -> None:
    text = DOC.read_text()
    refs = sorted(set(REFERENCE.findall(text)) | {(m, "") for m in MODULE.findall(text)})
    problems = []
    for module_path, qualname in refs:
        why = _missing(module_path, qualname)
        if why is not None:
            problems.append(f"{module_path}:{qualname}: {why}" if qualname else f"{module_path}: {why}")
    assert not problems, "docs/architecture.md cites names that do not exist:\n" + "\n".join(problems)


def test_the_request_flow_section_cites_the_code() -> None:
    text = DOC.read_text()
    assert SECTION in text, f"docs/architecture.md lacks the section {SECTION!r}"
    names = set(REFERENCE.findall(_section(text)))
    assert len(names) >= MIN_NAMES, f"the request flow cites {len(names)} names, fewer than {MIN_NAMES}"

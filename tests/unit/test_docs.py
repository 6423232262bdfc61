"""docs/: the flag table is what the code says, and the docs name only configs and files that exist."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _generator():  # tools/ is scripts, not a package
    spec = importlib.util.spec_from_file_location("gen_flag_table", ROOT / "tools" / "gen_flag_table.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_flag_table_is_current() -> None:
    gen = _generator()
    assert gen.TABLE.read_text() == gen.render(), "docs/flags.md is stale: run python tools/gen_flag_table.py"


def test_docs_point_at_files_that_exist() -> None:
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for path in re.findall(r"\b((?:configs|docs|docker|tools|bench)/[\w./-]+\.(?:yaml|md|py|env|conf|cpu|cuda))", doc.read_text()):
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which does not exist"


def test_metrics_doc_lists_every_metric() -> None:
    doc = (ROOT / "docs" / "metrics.md").read_text()
    for module in ("server", "frontend", "bootstrap"):
        source = (ROOT / "pd_serve" / module / "metrics.py").read_text()
        for name in re.findall(r'"(pd_(?:node|frontend|bootstrap)_\w+)"', source):
            assert f"`{name}`" in doc, f"docs/metrics.md lacks {name} (pd_serve/{module}/metrics.py)"

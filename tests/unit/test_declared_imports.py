"""Every third-party module the code imports comes from a dependency pyproject.toml declares
(tools/check_imports.py), so a fresh virtual environment runs what a developer's machine runs."""

from __future__ import annotations

import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import check_imports  # noqa: E402


def test_the_tree_imports_only_declared_dependencies() -> None:
    findings = check_imports.undeclared(
        check_imports.imports(), check_imports.declared(["test"]), metadata.packages_distributions()
    )
    assert findings == [], "\n".join(map(str, findings))


def test_removing_a_declared_dependency_is_caught() -> None:
    names = check_imports.declared(["test"])
    assert "pyyaml" in names
    findings = check_imports.undeclared(
        check_imports.imports(), names - {"pyyaml"}, metadata.packages_distributions()
    )
    assert [f.module for f in findings] == ["yaml"]
    assert findings[0].providers == ("pyyaml",)
    assert "pd_serve/cli_config.py" in findings[0].files


def test_an_extra_counts_only_when_asked_for() -> None:
    assert "pytest" in check_imports.declared(["test"])
    assert "pytest" not in check_imports.declared([])
    assert "torch" in check_imports.declared([])


def test_a_module_nothing_provides_is_caught_and_local_modules_are_not(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "helpers.py").write_text("import json\n")
    (tmp_path / "pkg" / "main.py").write_text(
        "import helpers\nfrom pkg import helpers as h\nimport not_a_real_module_xyz\nfrom . import x\n"
    )
    imported = check_imports.imports(tmp_path, ["pkg"])
    assert list(imported) == ["not_a_real_module_xyz"]
    findings = check_imports.undeclared(imported, set(), {})
    assert "no installed distribution provides it" in str(findings[0])

"""Fail when code imports a module that no declared dependency provides.

CI installs pd-serve with its `test` extra into a new virtual environment, so a module that some
other package happens to bring along (or that was installed by hand on a developer's machine) works
until that package changes or the machine is new. This check reads every import statement in
pd_serve/, tests/, bench/ and tools/, and asks the installed distributions which one provides each
top-level module (`importlib.metadata.packages_distributions`); that distribution must be named in
pd-serve's own requirements (its dependencies, or the extras given). It never imports the modules.

- imports(roots) -> {module: [files]}; the standard library and the repository's own modules
  (a `NAME.py` or `NAME/` anywhere under the roots) are left out
- declared(extras) -> the normalised names of the distributions pd-serve requires
- undeclared(...) -> one Finding per module whose providers are all undeclared (or not installed)

Usage: python tools/check_imports.py [--extra test] ; exit 1 and one line per finding on failure.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
ROOTS = ("pd_serve", "tests", "bench", "tools")
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


class Finding(NamedTuple):
    module: str
    providers: tuple[str, ...]  # installed distributions that provide it (none: not installed)
    files: tuple[str, ...]

    def __str__(self) -> str:
        where = ", ".join(self.files[:3]) + (f" (+{len(self.files) - 3} more)" if len(self.files) > 3 else "")
        if not self.providers:
            return f"{self.module}: imported by {where}, but no installed distribution provides it"
        names = " or ".join(self.providers)
        return f"{self.module}: imported by {where}; provided by {names}, which pyproject.toml does not declare"


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _top_level_imports(tree: ast.AST) -> Iterable[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def _files(root: Path, roots: Iterable[str]) -> list[Path]:
    return sorted(p for r in roots for p in (root / r).rglob("*.py") if "__pycache__" not in p.parts)


def local_modules(root: Path = ROOT, roots: Iterable[str] = ROOTS) -> set[str]:
    """Names the repository itself provides: packages and modules found under the roots."""
    names = set(roots)
    for path in _files(root, roots):
        names.add(path.stem)
        names.update(parent.name for parent in path.relative_to(root).parents if parent.name)
    return names


def imports(root: Path = ROOT, roots: Iterable[str] = ROOTS) -> dict[str, list[str]]:
    """Third-party top-level modules imported by the files under the roots, with the files."""
    local = local_modules(root, roots)
    found: dict[str, list[str]] = {}
    for path in _files(root, roots):
        for module in set(_top_level_imports(ast.parse(path.read_text(), str(path)))):
            if module not in sys.stdlib_module_names and module not in local:
                found.setdefault(module, []).append(str(path.relative_to(root)))
    return found


def declared(extras: Iterable[str] = ("test",), distribution: str = "pd-serve") -> set[str]:
    """Distributions pd-serve requires, from its installed metadata (so a fresh install is what counts)."""
    wanted = {normalise(e) for e in extras}
    names = set()
    for requirement in metadata.requires(distribution) or []:
        extra = _EXTRA.search(requirement)
        name = _NAME.match(requirement)
        if name and (extra is None or normalise(extra.group(1)) in wanted):
            names.add(normalise(name.group(1)))
    return names


def undeclared(
    imported: Mapping[str, list[str]],
    declared_names: set[str],
    providers: Mapping[str, list[str]],
) -> list[Finding]:
    findings = []
    for module, files in sorted(imported.items()):
        dists = tuple(sorted({normalise(d) for d in providers.get(module, [])}))
        if not dists or not declared_names.intersection(dists):
            findings.append(Finding(module, dists, tuple(sorted(files))))
    return findings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", action="append", default=None, help="extras counted as declared (default: test)")
    args = parser.parse_args(argv)
    extras = args.extra or ["test"]
    findings = undeclared(imports(), declared(extras), metadata.packages_distributions())
    for finding in findings:
        print(f"undeclared import: {finding}", file=sys.stderr)
    if findings:
        print(f"{len(findings)} undeclared import(s): add each provider to pyproject.toml's dependencies "
              f"(or the {'/'.join(extras)} extra), then reinstall", file=sys.stderr)
        return 1
    print(f"imports: every third-party module is provided by a declared dependency (extras: {', '.join(extras)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

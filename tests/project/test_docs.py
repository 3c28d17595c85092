"""The documents cite what exists: every file path, test id, dotted Python name and module name
the README and docs/ name is checked against the tree, so a move or a rename that forgets a doc
fails here instead of misleading a reader."""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "bench" / "README.md"]
TOP = ("relay", "operator", "tests", "bench", "scripts", "charts", "crds", "examples", "docs", ".ci")
# A path: one of the project's top folders, then path characters; an optional ::test id after it.
TOPS = "|".join(re.escape(t) for t in TOP)
PATH = re.compile(rf"(?<![\w./-])((?:{TOPS})/[\w./*<>-]*[\w*>/])(?:::(\w+))?")
# A test id relative to tests/, the way docs/RELAY-CORE.md writes them: `relay/test_x.py::name`.
TEST_ID = re.compile(r"(?<![\w/])((?:[\w-]+/)?test_\w+\.py)(?:::(\w+))?")
SAME_FILE = re.compile(r"(?<![\w:])::(test_\w+)")
DOTTED = re.compile(r"`((?:relay|relay_operator)(?:\.\w+)+)(?:\(\))?`")


def _relative(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


# Paths the docs name to say that they must not exist.
ABSENT = {"operator/__init__.py"}


def _resolve(path: str) -> Path | None:
    """The file or folder a cited path means: from the repository root, else under tests/, else
    (a bare test file name, as docs/RELIABILITY.md writes them) the one test file of that name."""
    clean = path.rstrip("/.")
    if "<" in clean or "*" in clean:  # a pattern (`bench/results/<commit>-<ts>.json`): its folder
        clean = clean[: min(i for i in (clean.find("<"), clean.find("*")) if i >= 0)].rsplit("/", 1)[0]
    for base in (ROOT, ROOT / "tests"):
        if (base / clean).exists():
            return base / clean
    if "/" not in clean:
        found = list((ROOT / "tests").rglob(clean))
        if len(found) == 1:
            return found[0]
    return None


def _defines(path: Path, name: str) -> bool:
    definition = rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b"
    return re.search(definition, path.read_text(), flags=re.M) is not None


def _citations() -> Iterator[tuple[str, str, str | None]]:
    for doc in DOCS:
        for line in doc.read_text().splitlines():
            found: dict[int, tuple[str, str | None]] = {}
            for pattern in (PATH, TEST_ID):
                for match in pattern.finditer(line):
                    inside = any(start <= match.start() < start + len(p) for start, (p, _) in found.items())
                    if not inside:
                        found[match.start()] = (match.group(1), match.group(2))
            for _, (path, name) in sorted(found.items()):
                yield _relative(doc), path, name
            # `file.py::a`, `::b`: the second id names a test in the file cited before it
            for match in SAME_FILE.finditer(line):
                before = [p for at, (p, _) in sorted(found.items()) if at < match.start() and p[-3:] == ".py"]
                if before:
                    yield _relative(doc), before[-1], match.group(1)


CITATIONS = sorted(set(_citations()), key=lambda c: (c[0], c[1], c[2] or ""))


def test_the_docs_cite_many_paths() -> None:
    # the patterns above find what the docs cite (a broken pattern would make the checks vacuous)
    assert len(CITATIONS) > 200
    assert ("docs/RELAY-CORE.md", "relay/test_front.py", "test_recipient_limit") in CITATIONS


@pytest.mark.parametrize(("doc", "path", "name"), CITATIONS)
def test_every_cited_path_exists(doc: str, path: str, name: str | None) -> None:
    if path in ABSENT:
        assert not (ROOT / path).exists(), f"{doc} says {path} must not exist"
        return
    target = _resolve(path)
    assert target is not None, f"{doc} cites {path}, which does not exist"
    if name is not None:
        defined = target.is_file() and _defines(target, name)
        assert defined, f"{doc} cites {path}::{name}, which is not defined there"


def _dotted() -> list[tuple[str, str]]:
    return sorted({(_relative(doc), m.group(1)) for doc in DOCS for m in DOTTED.finditer(doc.read_text())})


@pytest.mark.parametrize(("doc", "dotted"), _dotted())
def test_every_cited_python_name_exists(doc: str, dotted: str) -> None:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            assert hasattr(obj, attr), f"{doc} cites {dotted}: {'.'.join(parts[:cut])} has no {attr}"
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{doc} cites {dotted}, which is no module")


def _module_names() -> set[str]:
    names = {p.stem for p in (ROOT / "relay").rglob("*.py")}
    names |= {p.stem for p in (ROOT / "operator" / "relay_operator").rglob("*.py")}
    names |= {p.name for p in (ROOT / "relay").iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    return names - {"__init__", "__main__"}


def _package_modules() -> set[str]:
    """`cli/run`, `gateways/cache`: modules inside relay's packages, as the tables write them dotted."""
    return {str(p.relative_to(ROOT / "relay").with_suffix("")) for p in (ROOT / "relay").glob("*/*.py")}


def _design_module_map() -> list[str]:
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    start = text.index("- **Module map as built")
    end = text.index("The import-linter contracts in `pyproject.toml`", start)
    names = re.findall(r"`(\w+)`", text[start:end]) + re.findall(r"`relay/(\w+)(?:\.py|/)`", text[start:end])
    return [n for n in names if n not in {"build_gateway", "__init__"}]


def test_the_design_module_map_names_every_module_and_only_modules() -> None:
    cited = set(_design_module_map())
    modules = _module_names()
    assert cited - modules == set(), "the module map names modules that do not exist"
    assert modules - cited - {"py"} == set(), "modules missing from docs/DESIGN.md's module map"


def _relay_core_modules() -> list[tuple[str, str]]:
    rows = []
    for line in (ROOT / "docs" / "RELAY-CORE.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or cells[0] in {"rule", "---"}:
            continue
        for item in re.sub(r"\([^)]*\)", "", cells[1]).replace(";", ",").split(","):
            word = item.strip()
            if word and "/" not in word and "`" not in word and not (ROOT / word).exists():
                rows.append((cells[0][:50], word))
    return rows


@pytest.mark.parametrize(("rule", "module"), _relay_core_modules())
def test_relay_core_table_names_existing_modules(rule: str, module: str) -> None:
    known = _module_names() | {m.replace("/", ".") for m in _package_modules()}
    assert module in known, f"docs/RELAY-CORE.md row {rule!r} names module {module!r}, which does not exist"

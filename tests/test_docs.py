"""The docs live in the repository and stand alone: nothing points outside it (../shared is the maintainers'
folder, which users do not have), every "MATH.md §N" cited in the code is a section of docs/math.md, and
every relative link in README.md and docs/*.md reaches an existing file."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEARCHED = ["README.md", "docs", "fastdiff", "csrc", "scripts", "benchmarks"]
TEXT_SUFFIXES = {".md", ".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".txt", ".toml", ".cfg", ".json", ".yml",
                 ".yaml", ".ini", ""}
CODE_SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".sh", ".md"}
CITING = ["fastdiff", "csrc", "tests", "scripts", "benchmarks", "README.md", "docs/design.md"]


def _files(roots, suffixes):
    for root in roots:
        path = ROOT / root
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if p.suffix in suffixes and "__pycache__" not in p.parts:
                yield p


def _math_sections() -> set[str]:
    """The section numbers of docs/math.md, from headings like '## §3b Multistep ...'."""
    heads = re.findall(r"^#+\s*§(\d+[a-z]?)\b", (ROOT / "docs/math.md").read_text(), flags=re.MULTILINE)
    return set(heads)


def test_docs_exist_and_keep_the_cited_section_numbers():
    assert _math_sections() >= {"1", "2", "3", "3b", "4", "5", "6", "7", "8", "9"}
    assert (ROOT / "docs/design.md").is_file()


def test_nothing_points_outside_the_repository():
    files = list(_files(SEARCHED, TEXT_SUFFIXES))
    assert len(files) > 20                              # the walk found the tree
    offenders = [f"{p.relative_to(ROOT)}:{i}" for p in files
                 for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
                 if "../shared" in line or "shared/docs" in line]
    assert not offenders, "links out of the repository: " + ", ".join(offenders)


def _cited_sections():
    """(file:line, section) for every 'MATH.md §N' (also '§N, §M' lists after one MATH.md) in the code,
    the tests and the docs."""
    cite = re.compile(r"MATH(?:\.md)?\s*((?:§\s*\d+[a-z]?(?:\s*(?:,|and|or|/|–|-)\s*)?)+)")
    for p in _files(CITING, CODE_SUFFIXES):
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            for m in cite.finditer(line):
                for sec in re.findall(r"§\s*(\d+[a-z]?)", m.group(1)):
                    yield f"{p.relative_to(ROOT)}:{i}", sec


def test_every_cited_math_section_exists():
    cites = list(_cited_sections())
    assert len(cites) > 20                              # the code does cite MATH.md
    sections = _math_sections()
    missing = [f"{where} §{sec}" for where, sec in cites if sec not in sections]
    assert not missing, "cited but not a section of docs/math.md: " + ", ".join(missing)


def _relative_links(md: Path):
    """Targets of markdown links [text](target) that are not URLs or in-page anchors."""
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.DOTALL)          # code blocks hold no links
    for target in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


@pytest.mark.parametrize("md", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))])
def test_relative_links_resolve(md):
    path = ROOT / md
    broken = [t for t in _relative_links(path) if not (path.parent / t).exists()]
    assert not broken, f"{md}: links to missing files: {broken}"

"""Design citations resolve: every "design.md §X" in the code names a section of docs/design.md.

The code cites the design notes by section (docs/design.md, headings "## 2." / "### 2a." ...).
These tests keep the citations and the notes in step, and keep the package free of citations of
the old out-of-repository specification and of paths outside the repository (``../shared``),
which a clone of bsafuse does not have. Plain text scans: no torch, well under a second.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DESIGN = REPO / "docs" / "design.md"
# Where citations are checked: the package, the benchmarks and the README.
CITING = (
    sorted((REPO / "bsafuse").rglob("*.py"))
    + sorted((REPO / "benchmarks").rglob("*.py"))
    + [REPO / "README.md"]
)

HEADING = re.compile(r"^#{1,6}\s+(\d+[a-z]?)\.\s", re.MULTILINE)
# "design.md §6", "design.md §6, §7", "design.md §3, §6 and §7"
CITATION = re.compile(r"design\.md\s*(§\s*\d+[a-z]?(?:\s*(?:,|and|&)\s*§\s*\d+[a-z]?)*)")
SECTION = re.compile(r"§\s*(\d+[a-z]?)")
WRONG_FORM = re.compile(r"design\.md,?\s+(?:sections?|sec\.)\s*\d")
# Old-style citations of the former specification: its name, then ".md" or a section number.
# Built from pieces so that this file does not cite it itself; \b keeps SPECT out.
OLD_SPEC = re.compile(r"\b" + "SPEC" + r"(?:\.md\b|\s+(?:sections?\s+)?\d)")
OUTSIDE_PATH = re.compile(r"\.\./" + "shared" + r"\b")


def _sections() -> set[str]:
    return set(HEADING.findall(DESIGN.read_text(encoding="utf-8")))


def _lines(files: list[Path]) -> list[tuple[str, int, str]]:
    rows = []
    for file in files:
        for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            rows.append((file.relative_to(REPO).as_posix(), number, line))
    return rows


def test_design_notes_keep_their_numbering() -> None:
    assert DESIGN.is_file(), "docs/design.md is missing"
    sections = _sections()
    wanted = {"1", "2", "2a", *(str(n) for n in range(3, 10))}
    assert wanted <= sections, f"missing sections: {sorted(wanted - sections)}"


def test_every_design_citation_names_a_section() -> None:
    sections = _sections()
    bad = []
    for path, number, line in _lines(CITING):
        for match in CITATION.finditer(line):
            for section in SECTION.findall(match.group(1)):
                if section not in sections:
                    bad.append(f"{path}:{number}: §{section} is no heading of docs/design.md: {line.strip()}")
        if WRONG_FORM.search(line):
            bad.append(f"{path}:{number}: cite as 'design.md §N': {line.strip()}")
    assert not bad, "\n".join(bad)


def test_package_cites_no_old_spec_and_no_path_outside_the_repository() -> None:
    bad = [
        f"{path}:{number}: {line.strip()}"
        for path, number, line in _lines(sorted((REPO / "bsafuse").rglob("*.py")))
        if OLD_SPEC.search(line) or OUTSIDE_PATH.search(line)
    ]
    assert not bad, "cite docs/design.md (design.md §N) and the repository's own files:\n" + "\n".join(bad)


@pytest.mark.parametrize(
    ("text", "sections"),
    [
        ("(design.md §2a)", ["2a"]),
        ("(design.md §6, §7)", ["6", "7"]),
        ("(design.md §3, §6 and §7)", ["3", "6", "7"]),
        ("see design.md §2.", ["2"]),
    ],
)
def test_citation_pattern_reads_every_section(text: str, sections: list[str]) -> None:
    (match,) = CITATION.finditer(text)
    assert SECTION.findall(match.group(1)) == sections


def test_old_spec_pattern_spares_the_modality_name() -> None:
    assert OLD_SPEC.search("SPEC" + " 2a") and OLD_SPEC.search("SPEC" + ".md section 3")
    assert OLD_SPEC.search("SPEC" + " sections 4 and 7")
    assert not OLD_SPEC.search("CT/PET/SPECT images, SPECT-MRI 10014, spect-mri")

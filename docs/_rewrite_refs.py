"""Point the code's design citations at docs/design.md (run once; running it again changes nothing).

The code cited the old, out-of-repository specification as "SPEC 2a", "SPEC section 5",
"SPEC.md section 3", and some docstrings pointed at ``../shared/...`` files that a clone of the
repository does not have. This script rewrites exactly the citations listed in REPLACEMENTS below
(each one an exact piece of text in one file) to "design.md §N" and to the repository's own copies
(tests/data/...). It never touches docs/ and never the word SPECT.

    python docs/_rewrite_refs.py              # rewrite, then list anything still left
    python docs/_rewrite_refs.py --check      # change nothing; exit 1 if a rewrite is still due
    python docs/_rewrite_refs.py --generic    # also rewrite citations added since, by pattern

Idempotent: a replacement whose old text is gone and whose new text is present is already done;
one whose old and new text are both gone (the code was edited since) is a note, not an error.
Exit status: 0 when nothing is due and no old-style citation ("SPEC <n>", "SPEC section <n>",
"SPEC.md") or, in bsafuse/, ``../shared`` path is left in the scanned trees; 1 otherwise, with
the leftovers listed (edit them by hand, or rerun with --generic for the citation forms).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("bsafuse", "benchmarks", "examples", "tests", "README.md", "CHANGELOG.md")
SUFFIXES = (".py", ".md", ".txt", ".toml", ".cfg", ".ini", ".rst")
# An old-style citation: "SPEC 2a", "SPEC section 5", "SPEC sections 4 and 7", "SPEC.md ...".
# \bSPEC\b never matches inside SPECT.
OLD_CITATION = re.compile(r"\bSPEC(?:\.md\b|\s+(?:sections?\s+)?\d)")
SHARED_PATH = re.compile(r"\.\./shared\b")
# What --generic rewrites: "SPEC 6", "SPEC 6, 7", "SPEC section 5", "SPEC sections 3, 6 and 7",
# "SPEC.md section 2a" (group 1: the section list).
GENERIC = re.compile(r"\bSPEC(?:\.md)?\s+(?:sections?\s+)?(\d+[a-z]?(?:(?:,\s*|\s+and\s+)\d+[a-z]?)*)")

# (file relative to the repository root, old text, new text). Every occurrence of the old text in
# that file is replaced (api.py and config.py each hold one of theirs twice).
REPLACEMENTS: tuple[tuple[str, str, str], ...] = (
    # --- "SPEC ..." citations
    ("bsafuse/working_size.py", "(SPEC 1)", "(design.md §1)"),
    ("bsafuse/prealign.py", "(SPEC section 5)", "(design.md §5)"),
    ("bsafuse/model/bsafusion.py", "see SPEC.md section 2.", "see design.md §2."),
    ("bsafuse/model/bsafusion.py", "(SPEC 2a)", "(design.md §2a)"),
    ("bsafuse/evaluation/protocol.py", "scored (SPEC 6).", "scored (design.md §6)."),
    ("bsafuse/evaluation/__init__.py", "(SPEC 6, 7)", "(design.md §6, §7)"),
    ("bsafuse/evaluation/__init__.py", "Per SPEC 6, A", "Per design.md §6, A"),
    ("bsafuse/evaluation/methods.py", "pair (SPEC 6).", "pair (design.md §6)."),
    ("bsafuse/evaluation/methods.py", "(pre-alignment as in SPEC 5)", "(pre-alignment as in design.md §5)"),
    ("bsafuse/evaluation/methods.py", "there (SPEC 1)", "there (design.md §1)"),
    ("bsafuse/training/presets.py", "the recipe of SPEC section 3", "the recipe of design.md §3"),
    ("bsafuse/training/state.py", "(SPEC section 3)", "(design.md §3)"),
    ("bsafuse/training/trainer.py", "(SPEC section 3)", "(design.md §3)"),
    ("bsafuse/config.py", "(SPEC 2a)", "(design.md §2a)"),
    ("bsafuse/data.py", "(SPEC sections 4 and 7)", "(design.md §4 and §7)"),
    ("bsafuse/data.py", "laid out as SPEC section 7.", "laid out as design.md §7."),
    ("bsafuse/api.py", "(SPEC 1 and 5)", "(design.md §1 and §5)"),
    ("bsafuse/api.py", "(SPEC 5)", "(design.md §5)"),
    ("bsafuse/cli/train.py", "(SPEC sections 3, 6 and 7)", "(design.md §3, §6 and §7)"),
    ("bsafuse/weights.py", "(SPEC 6)", "(design.md §6)"),
    ("bsafuse/io/png.py", "SPEC.md section 5", "design.md §5"),
    ("bsafuse/io/color.py", "SPEC.md section 2a", "design.md §2a"),
    ("bsafuse/deform.py", "(SPEC section 4)", "(design.md §4)"),
    ("bsafuse/deform.py", "fixed-point iteration, SPEC section 4)", "fixed-point iteration, design.md §4)"),
    ("bsafuse/deform.py", "(SPEC section 2a)", "(design.md §2a)"),
    ("bsafuse/deform.py", "as SPEC section 2a asks", "as design.md §2a asks"),
    ("bsafuse/losses.py", "SPEC.md section 3", "design.md §3"),
    ("bsafuse/losses.py", "(SPEC 3)", "(design.md §3)"),
    ("benchmarks/_common.py", "(SPEC 2a)", "(design.md §2a)"),
    ("CHANGELOG.md", "the fixes SPEC 2a lists", "the fixes design.md §2a lists"),
    # --- "SPEC ..." together with a ../shared path
    (
        "bsafuse/evaluation/scoring.py",
        "(SPEC 6, ../shared/metrics-reference)",
        "(design.md §6; tests/data/metrics-reference)",
    ),
    (
        "bsafuse/evaluation/cases.py",
        "(SPEC 7, as ../shared/data/harvard/CT-MRI)",
        "(design.md §7, as tests/data/harvard/CT-MRI)",
    ),
    # --- ../shared paths
    (
        "bsafuse/evaluation/__init__.py",
        "(the paper's, see ../shared/metrics-reference/README.md)",
        "(the paper's; design.md §6, tests/data/metrics-reference)",
    ),
    (
        "bsafuse/metrics/fusion.py",
        "../shared/metrics-reference/README.md lists every convention.",
        "tests/data/metrics-reference/README.md lists every convention.",
    ),
    (
        "bsafuse/data.py",
        "exactly as ../shared/data/harvard/CT-MRI.",
        "exactly as tests/data/harvard/CT-MRI.",
    ),
)


def _check_table() -> None:
    for path, old, new in REPLACEMENTS:
        if path.startswith("docs/"):
            raise SystemExit(f"internal error: {path} is under docs/")
        if "SPECT" in old:  # the table never rewrites the modality name
            raise SystemExit(f"internal error: {old!r} mentions SPECT")
        if old in new:
            raise SystemExit(f"internal error: {old!r} is part of its own replacement (not idempotent)")


def _generic(text: str) -> str:
    """Rewrite any remaining "SPEC 6" / "SPEC sections 3, 6 and 7" / "SPEC.md section 2a" form."""

    def cite(match: re.Match[str]) -> str:
        return "design.md " + re.sub(r"(\d+[a-z]?)", r"§\1", match.group(1))

    return GENERIC.sub(cite, text)


def rewrite(*, write: bool, generic: bool = False) -> tuple[list[str], list[str]]:
    """Apply REPLACEMENTS (and, with `generic`, GENERIC); return (due, notes).

    `due`: files that still need a rewrite (only when not writing). `notes`: replacements whose
    old and new text are both absent (the code was edited since the table was made; the leftover
    scan shows whether a citation in some new wording remains).
    """
    due: list[str] = []
    notes: list[str] = []
    by_file: dict[str, list[tuple[str, str]]] = {}
    for path, old, new in REPLACEMENTS:
        by_file.setdefault(path, []).append((old, new))
    files = list(by_file)
    if generic:
        files += [f.relative_to(ROOT).as_posix() for f in _scanned_files()]
    for rel in dict.fromkeys(files):
        file = ROOT / rel
        if not file.is_file():
            notes.append(f"{rel}: no such file")
            continue
        text = original = file.read_text(encoding="utf-8")
        for old, new in by_file.get(rel, []):
            count = text.count(old)
            if count:
                text = text.replace(old, new)
                print(f"{rel}: {old!r} -> {new!r}" + (f" ({count}x)" if count > 1 else ""))
            elif new not in text:
                notes.append(f"{rel}: neither {old!r} nor {new!r} found (edited since?)")
        if generic and rel.endswith((".py", ".md")):
            again = _generic(text)
            if again != text:
                print(f"{rel}: generic rewrite of {len(GENERIC.findall(text))} citation(s)")
                text = again
        if text != original:
            if write:
                file.write_text(text, encoding="utf-8")
            else:
                due.append(f"{rel}: rewrite due")
    return due, notes


def _scanned_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            files.append(top)
        elif top.is_dir():
            files.extend(p for p in sorted(top.rglob("*")) if p.is_file() and p.name.endswith(SUFFIXES))
    return files


def leftovers() -> list[str]:
    """Old-style citations and ../shared paths still in the scanned trees (docs/ excluded)."""
    found: list[str] = []
    for file in _scanned_files():
        rel = file.relative_to(ROOT).as_posix()
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            continue
        for number, line in enumerate(lines, 1):
            if OLD_CITATION.search(line) or (rel.startswith("bsafuse/") and SHARED_PATH.search(line)):
                found.append(f"{rel}:{number}: {line.strip()}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if work is due")
    parser.add_argument(
        "--generic",
        action="store_true",
        help="also rewrite citations that are not in the table (any 'SPEC <n>' form) by pattern",
    )
    args = parser.parse_args(argv)
    _check_table()
    due, notes = rewrite(write=not args.check, generic=args.generic)
    left = leftovers()
    for line in notes:
        print(f"note: {line}", file=sys.stderr)
    for line in due:
        print(f"due: {line}", file=sys.stderr)
    for line in left:
        print(f"left (edit by hand, or rerun with --generic): {line}", file=sys.stderr)
    if not due and not left:
        print("all design citations point at docs/design.md")
    return 1 if due or left else 0


if __name__ == "__main__":
    sys.exit(main())

"""References into docs/architecture.md (issue 18 item 7): every "architecture §N.M" in the tracked source and
documentation files (.py, .md, .yaml, .yml, .ipynb) must name a numbered section heading of that document, and
its headings must be numbered once each."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
SELF = Path(__file__).resolve()
SUFFIXES = (".py", ".md", ".yaml", ".yml", ".ipynb")

HEADING = re.compile(r"^#{1,6}[ \t]+(\d+(?:\.\d+)*)\.?[ \t]", re.M)
# "architecture §3.4.5", "architecture §5.2-5.3", "architecture §3.4.4-5", "Architecture §2.1/§2.2" (also across a
# line break after "architecture")
REF = re.compile(r"\barchitecture\s+((?:§\d+(?:\.\d+)*(?:-\d+(?:\.\d+)*)?(?:\s*(?:/|,|and)\s*(?=§))?)+)",
                 re.IGNORECASE)
NUMBER = re.compile(r"§(\d+(?:\.\d+)*)(?:-(\d+(?:\.\d+)*))?")


def sections() -> list[str]:
    """The section numbers of docs/architecture.md's headings, in order ("3", "3.4", "3.4.5", ...)."""
    return HEADING.findall(DOC.read_text(encoding="utf-8"))


def tracked_files() -> list[Path]:
    """The tracked files with one of SUFFIXES (git ls-files), this test excepted; outside a git checkout, every such
    file below the repository root that is not in a hidden folder."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", *(f"*{s}" for s in SUFFIXES)], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.CalledProcessError):
        files = [p for p in ROOT.rglob("*") if p.suffix in SUFFIXES
                 and not any(part.startswith(".") for part in p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file() and p.resolve() != SELF)


def cited_sections(text: str) -> list[tuple[int, str]]:
    """(line number, section number) of every "architecture §" reference in text; a range names both ends
    ("§3.4.4-5" -> 3.4.4 and 3.4.5, "§5.2-5.3" -> 5.2 and 5.3)."""
    out = []
    for m in REF.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for first, last in NUMBER.findall(m.group(1)):
            out.append((line, first))
            if last:
                head, tail = first.split("."), last.split(".")
                out.append((line, ".".join(head[: max(len(head) - len(tail), 0)] + tail)))
    return out


def test_headings_are_numbered_once():
    numbers = sections()
    assert numbers, f"{DOC} has no numbered section headings"
    repeated = sorted({n for n in numbers if numbers.count(n) > 1})
    assert not repeated, f"{DOC.name}: section numbers used by more than one heading: {repeated}"
    # every subsection sits under its parent section (3.4.5 under 3.4, 3.4 under 3)
    orphans = [n for n in numbers if "." in n and n.rsplit(".", 1)[0] not in numbers]
    assert not orphans, f"{DOC.name}: subsections without their parent heading: {orphans}"


def test_architecture_references_name_existing_sections():
    known = set(sections())
    missing = [f"{path.relative_to(ROOT)}:{line}: architecture §{number}"
               for path in tracked_files()
               for line, number in cited_sections(path.read_text(encoding="utf-8", errors="replace"))
               if number not in known]
    assert not missing, ("references to sections that docs/architecture.md does not have:\n  "
                         + "\n  ".join(missing))


# The out-of-repo spec documents, as code and docs cited them before issue 18 item 7: "spec §3.4.5", "Spec §3.2",
# "spec v4-ga-dspark §4" (also with a line break after "spec"). The performance targets stay "performance.md §N".
OLD_REF = re.compile(r"\bspec(?:\s+v4-ga-dspark)?\s+§", re.IGNORECASE)


def test_no_reference_into_the_spec_documents_remains():
    left = [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start()) + 1}: {m.group(0)!r}"
            for path in tracked_files()
            for text in [path.read_text(encoding="utf-8", errors="replace")]
            for m in OLD_REF.finditer(text)]
    assert not left, ("references into the spec documents outside the repository; point them at "
                      "docs/architecture.md (architecture §N, the GA reference's §N is §8.N):\n  " + "\n  ".join(left))

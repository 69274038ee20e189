"""The README is the front door: it fits on a page and every link in it leads somewhere."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
MAX_README_LINES = 180
# [text](target) links that are not URLs or anchors: files of this repository.
_LOCAL_LINK = re.compile(r"\]\((?!https?://|#|mailto:)([^)\s]+)\)")


def test_the_readme_fits_on_a_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines, more than {MAX_README_LINES}"


def test_every_local_link_of_the_readme_and_the_docs_points_at_a_file():
    missing = []
    for document in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for target in _LOCAL_LINK.findall(document.read_text(encoding="utf-8")):
            path = (document.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                missing.append(f"{document.relative_to(REPO)} -> {target}")
    assert not missing, "links to files that do not exist:\n" + "\n".join(missing)

"""README and docs/ stay a map that leads somewhere (issue 14): a short README that opens with the two set-up
commands, every module and folder on its map, and every relative link and anchor of the docs resolving."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short_and_opens_with_the_set_up_commands():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    first_block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "demo"], ["make", "test"]]
    assert readme.index("```bash") < readme.index("\n## ")  # before anything else
    assert "make test-fast" in readme


@pytest.mark.distributed  # runs git
def test_readme_maps_every_module_and_folder():
    readme = (REPO / "README.md").read_text()
    code_map = readme[readme.index("## Map of the code"):]
    for package in ("dpo_ds", "launcher"):
        missing = [p.name for p in sorted((REPO / package).glob("*.py")) if f"`{p.name}`" not in code_map]
        assert not missing, f"README.md's map of the code lacks {package}/{missing}"
        for sub in sorted(p for p in (REPO / package).iterdir() if (p / "__init__.py").is_file()):
            row = next((line for line in code_map.splitlines() if line.startswith(f"| `{sub.name}/`")), None)
            assert row is not None, f"README.md's map of the code lacks {package}/{sub.name}/"
            missing = [p.name for p in sorted(sub.glob("*.py")) if p.name != "__init__.py" and f"`{p.name}`" not in row]
            assert not missing, f"README.md's map row of {package}/{sub.name}/ lacks {missing}"
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    folders = sorted({path.split("/")[0] for path in tracked.splitlines() if "/" in path})
    missing = [name for name in folders if f"`{name}/`" not in code_map]
    assert not missing, f"README.md's map of the code lacks the folders {missing}"


def test_relative_links_and_anchors_resolve():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, broken


def test_a_unit_test_that_starts_a_process_fails(pytester):
    """The markers stay honest: conftest refuses a process started by a test (or its fixture) marked unit."""
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini((REPO / "pytest.ini").read_text().replace("addopts = --strict-markers -p pytester\n", ""))
    pytester.makepyfile(test_inner='''
        import multiprocessing, subprocess, pytest

        def test_subprocess():
            subprocess.run(["true"])

        def test_pool():
            multiprocessing.get_context("spawn").Process(target=print).start()

        @pytest.fixture(scope="module")
        def ranks():
            subprocess.run(["true"])

        def test_module_fixture(ranks):
            pass

        def test_swallowed():
            try:
                subprocess.run(["true"])
            except RuntimeError:
                pass

        def test_in_process():
            assert sum(range(4)) == 6
    ''')
    result = pytester.runpytest_inprocess("-m", "unit", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3, errors=1)
    result.stdout.fnmatch_lines_random([
        "*RuntimeError: a unit test started a process (subprocess): mark the test distributed",
        "*RuntimeError: a unit test started a process (multiprocessing): mark the test distributed",
        "*test_swallowed is marked unit but started a process (subprocess): mark it distributed"])

"""The Python examples of README.md and docs/*.md parse, and the runnable ones run.

An example is a fenced ``python`` block whose fence is preceded by a marker line:

    <!-- example -->          parsed (ast.parse): for code that needs names from around it
                              or a live server (an HttpOperator call, a DAG that sends)
    <!-- example: run -->     parsed and executed, so it must need no live server: building
                              a DAG or an operator, a subclass, parse_limits(...), imports

Blank lines may separate the marker from its fence; an HTML comment is invisible on GitHub.
Unmarked blocks are not checked. A marker that marks no ``python`` block, a marked block
that is empty, and an unknown marker fail the test that finds examples, with file:line.

The runnable examples run in one subprocess, the way a user would try them: the project's
``plugins/`` on ``PYTHONPATH``, a private ``AIRFLOW_HOME``, its own working directory.
That process imports Airflow once and runs each example in a forked child of its own, so
one example cannot change what the next sees, and a traceback names the Markdown file and
the line of the failing statement.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from tests.conftest import PLUGINS_DIR, REPO_ROOT

#: The Markdown files whose examples are checked.
DOC_FILES = (REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")))
MARKER = re.compile(r"^\s*<!--\s*example(?:\s*:\s*(?P<kind>[\w-]+))?\s*-->\s*$")
KINDS = {None: "parse", "run": "run"}
FENCE_OPEN = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\s]*)")
PYTHON_INFO = {"python", "py", "python3"}
#: The whole subprocess (every runnable example); each example gets RUN_TIMEOUT_EACH.
RUN_TIMEOUT_EACH = 60


@dataclass(frozen=True)
class Example:
    """One marked block: where it is, whether it runs, and its code."""

    path: Path
    #: 1-based line of the block's first line of code (the line after the opening fence).
    line: int
    kind: str
    code: str

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO_ROOT).as_posix() if self.path.is_relative_to(REPO_ROOT) else self.path}:{self.line}"

    def padded(self) -> str:
        """The code with blank lines in front, so compiled line numbers are the file's."""
        return "\n" * (self.line - 1) + self.code


def find_examples(path: Path, text: str) -> tuple[list[Example], list[str]]:
    """The marked examples of one Markdown text, and the problems found (``file:line: why``)."""
    where = path.relative_to(REPO_ROOT).as_posix() if path.is_relative_to(REPO_ROOT) else str(path)
    lines = text.splitlines()
    examples: list[Example] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # (line of the marker, kind)
    index = 0
    while index < len(lines):
        line = lines[index]
        marker = MARKER.match(line)
        opening = FENCE_OPEN.match(line)
        if marker:
            if pending:
                problems.append(f"{where}:{pending[0]}: the example marker marks no python block")
            kind = marker.group("kind")
            if kind not in KINDS:
                problems.append(f"{where}:{index + 1}: unknown marker {line.strip()!r} "
                                "(use <!-- example --> or <!-- example: run -->)")
                pending = None
            else:
                pending = (index + 1, KINDS[kind])
            index += 1
            continue
        if opening:
            indent, fence = len(opening.group("indent")), opening.group("fence")
            close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
            end = index + 1
            while end < len(lines) and not close.match(lines[end]):
                end += 1
            body = [_unindent(text_line, indent) for text_line in lines[index + 1:end]]
            if pending:
                if opening.group("info").lower() not in PYTHON_INFO:
                    problems.append(f"{where}:{pending[0]}: the example marker marks a "
                                    f"{opening.group('info') or 'plain'!s} block, not python")
                elif not "".join(body).strip():
                    problems.append(f"{where}:{index + 2}: the marked python block is empty")
                else:
                    examples.append(Example(path, index + 2, pending[1], "\n".join(body) + "\n"))
                pending = None
            index = end + 1
            continue
        if pending and line.strip():
            problems.append(f"{where}:{pending[0]}: the example marker marks no python block")
            pending = None
        index += 1
    if pending:
        problems.append(f"{where}:{pending[0]}: the example marker marks no python block")
    return examples, problems


def _unindent(line: str, indent: int) -> str:
    """A fenced line without the fence's own indentation (CommonMark: at most that much)."""
    stripped = len(line) - len(line.lstrip(" "))
    return line[min(indent, stripped):]


def _all_examples() -> tuple[list[Example], list[str]]:
    examples: list[Example] = []
    problems: list[str] = []
    for path in DOC_FILES:
        found, wrong = find_examples(path, path.read_text(encoding="utf-8"))
        examples += found
        problems += wrong
    return examples, problems


EXAMPLES, PROBLEMS = _all_examples()
RUNNABLE = [example for example in EXAMPLES if example.kind == "run"]


# -- the finder itself --------------------------------------------------------------------------


def test_the_finder_reads_markers_kinds_and_file_lines_and_reports_wrong_markers():
    text = "\n".join([
        "# Title",                         # 1
        "<!-- example: run -->",           # 2
        "```python",                       # 3
        "x = 1",                           # 4
        "```",                             # 5
        "<!-- example -->",                # 6
        "",                                # 7
        "   ```py",                        # 8: indented, as in a list item
        "   y = x",                        # 9
        "   ```",                          # 10
        "```python",                       # 11: unmarked, not checked
        "not python at all",               # 12
        "```",                             # 13
        "<!-- example -->",                # 14
        "```python",                       # 15
        "",                                # 16
        "```",                             # 17
        "<!-- example -->",                # 18
        "```bash",                         # 19
        "ls",                              # 20
        "```",                             # 21
        "<!-- example: later -->",         # 22
        "<!-- example -->",                # 23
        "Some prose.",                     # 24
    ])
    examples, problems = find_examples(REPO_ROOT / "docs" / "sample.md", text)
    assert [(e.line, e.kind, e.code) for e in examples] == [(4, "run", "x = 1\n"), (9, "parse", "y = x\n")]
    assert examples[0].where == "docs/sample.md:4"
    with pytest.raises(SyntaxError) as error:  # a padded block reports the file's line numbers
        ast.parse(replace(examples[1], code="y = (\n").padded())
    assert error.value.lineno == 9
    assert problems == [
        "docs/sample.md:16: the marked python block is empty",
        "docs/sample.md:18: the example marker marks a bash block, not python",
        "docs/sample.md:22: unknown marker '<!-- example: later -->' (use <!-- example --> or <!-- example: run -->)",
        "docs/sample.md:23: the example marker marks no python block",
    ]


def test_the_docs_have_runnable_examples_and_every_marker_marks_a_python_block():
    assert not PROBLEMS, "\n".join(PROBLEMS)
    assert RUNNABLE, "no <!-- example: run --> block in README.md or docs/*.md"


# -- the examples -------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda example: example.where)
def test_the_example_parses(example: Example):
    try:
        ast.parse(example.padded(), filename=example.where.rsplit(":", 1)[0])
    except SyntaxError as error:
        pytest.fail(f"{example.path.name}:{error.lineno}: {error.msg}\n{error.text or ''}")


#: Runs in the subprocess: import Airflow once, then each example in a forked child.
_RUNNER = r"""
import json, os, signal, sys, traceback
import airflow.sdk, network_requests  # paid once, before the forks
examples, timeout, results = json.load(sys.stdin), int(sys.argv[1]), {}
for index, (where, filename, code) in enumerate(examples):
    output = f"example-{index}.log"
    pid = os.fork()
    if pid == 0:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        signal.alarm(timeout)
        try:
            exec(compile(code, filename, "exec"), {"__name__": "__main__"})
        except BaseException:
            traceback.print_exc()
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(1)
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    with open(output, encoding="utf-8", errors="replace") as log:
        results[where] = {"status": status, "output": log.read()[-6000:]}
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def run_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every runnable example's exit status and output, by ``file:line``."""
    if not RUNNABLE:
        return {}
    home = tmp_path_factory.mktemp("docs-examples-home")
    work = tmp_path_factory.mktemp("docs-examples-cwd")
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("AIRFLOW", "NETWORK_REQUESTS", "PYTHON"))}
    env.update({
        "PYTHONPATH": str(PLUGINS_DIR),
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(home / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
    })
    payload = [(e.where, e.where.rsplit(":", 1)[0], e.padded()) for e in RUNNABLE]
    result = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(RUN_TIMEOUT_EACH)], input=json.dumps(payload), capture_output=True,
        text=True, cwd=work, env=env, timeout=120 + RUN_TIMEOUT_EACH * len(RUNNABLE),
    )
    assert result.returncode == 0, f"the example runner failed:\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("example", RUNNABLE, ids=lambda example: example.where)
def test_the_example_runs_without_a_live_server(example: Example, run_results: dict[str, dict]):
    outcome = run_results[example.where]
    if outcome["status"] != 0:
        how = "timed out" if os.WIFSIGNALED(outcome["status"]) else "failed"
        pytest.fail(f"{example.where}: the example {how}:\n{outcome['output']}", pytrace=False)

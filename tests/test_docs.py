"""The documentation (README.md, docs/*.md) against the code.

* Every option string of every script's parser (the training scripts', prune.py,
  evaluate.py, export.py, reproduce.py, summarize.py) appears in README.md or
  docs/*.md.
* Every command shown in a ```bash block that runs one of the project's Python
  scripts (``python X.py ...``, ``torchrun ... X.py ...``) is accepted by that
  script's own parser and checks, read with ``shlex`` exactly as typed (quotes
  included), and is safe to paste into a shell (no unquoted glob, brace,
  redirection or pipe characters). Nothing is run.
* README.md stays short (at most 250 lines), links every docs/*.md page, keeps
  the one test command CI runs, and every relative link of the README and the
  pages points at a file (and a heading) that exists.

The checkers themselves are tested on made-up input, so that a check that
accepted everything would fail here.
"""
import argparse
import contextlib
import functools
import importlib.util
import io
import re
import shlex
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAX_README_LINES = 250
TEST_COMMAND = "python -m pytest -q"
# The scripts whose every flag must be documented.
TRAINING_SCRIPTS = ("train_vgg.py", "train_resnet56.py", "train_resnet50.py")
DOCUMENTED_SCRIPTS = TRAINING_SCRIPTS + ("prune.py", "evaluate.py", "export.py", "reproduce.py", "summarize.py")
# Characters the shell would expand or interpret when they are not quoted.
SHELL_SPECIAL = set("{}[]*?<>|;&$`")


def doc_files() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def documentation() -> str:
    return "\n".join(path.read_text() for path in doc_files())


# ------------------------------------------------------------------ the scripts' parsers


@functools.cache
def load_script(script: str):
    """The script as a module (its ``__main__`` block does not run)."""
    path = ROOT / script
    spec = importlib.util.spec_from_file_location("_docs_" + re.sub(r"\W", "_", script), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_of(module):
    """The training script's Recipe (``RECIPE``, whatever its name)."""
    from engine.cli import Recipe
    recipes = [value for value in vars(module).values() if isinstance(value, Recipe)]
    assert len(recipes) == 1, f"{module.__file__}: expected one Recipe, found {len(recipes)}"
    return recipes[0]


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def _capture_parser(main) -> argparse.ArgumentParser:
    """The parser a ``main()`` builds, caught at its ``parse_args`` call (nothing else runs)."""
    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), mock.patch.object(sys, "argv", ["x"]):
        try:
            main()
        except _Captured as caught:
            return caught.parser
    raise AssertionError(f"{main.__module__}.main() returned without parsing its command line")


@functools.cache
def script_parser(script: str) -> argparse.ArgumentParser:
    """The script's argparse parser: engine.cli.build_parser(recipe) for a training script, its
    ``build_parser()`` where it has one, else the parser its ``main()`` builds."""
    module = load_script(script)
    if script in TRAINING_SCRIPTS:
        from engine.cli import build_parser
        return build_parser(recipe_of(module))
    if callable(getattr(module, "build_parser", None)):
        return module.build_parser()
    return _capture_parser(module.main)


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings]


def undocumented(options, text: str) -> list[str]:
    """The options that do not appear in ``text`` as a whole token (``--lr`` inside
    ``--lr_vgg`` or ``-b`` inside ``--batch`` does not count)."""
    return [o for o in options if not re.search(r"(?<![\w-])" + re.escape(o) + r"(?![\w-])", text)]


def parse_status(script: str, argv: list[str]) -> tuple[int, str]:
    """Parse ``argv`` with the script's own command-line checks; ``(exit status, stderr)``, 0 if accepted."""
    module = load_script(script)
    if script in TRAINING_SCRIPTS:
        from engine.cli import parse_args
        parse = functools.partial(parse_args, recipe_of(module), argv)
    elif callable(getattr(module, "parse_args", None)):
        parse = functools.partial(module.parse_args, argv)
    else:
        parse = functools.partial(script_parser(script).parse_args, argv)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parse()
        except SystemExit as e:
            return (e.code if isinstance(e.code, int) else 1), err.getvalue().strip()
    return 0, ""


# -------------------------------------------------------------- commands in the docs



class Command:
    """A command of a ```bash block that runs a Python script of the project."""

    def __init__(self, path: Path, line: int, text: str, script: str, argv: list[str]):
        self.path, self.line, self.text, self.script, self.argv = path, line, text, script, argv

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def fenced_blocks(text: str, language: str = "bash"):
    """``(first line number, lines)`` of every ```language block."""
    block, start = None, 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```\s*(\S*)\s*$", line)
        if fence and block is None:
            block, start, kind = [], number + 1, fence.group(1)
        elif fence:
            if kind == language:
                yield start, block
            block = None
        elif block is not None:
            block.append(line)


def logical_lines(start: int, lines: list[str]):
    """``(line number, text)`` with backslash continuations joined."""
    pending, first = "", start
    for number, line in enumerate(lines, start=start):
        if not pending:
            first = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def script_command(text: str) -> tuple[str, list[str]] | None:
    """``(script, argv)`` if the shell line runs ``python X.py`` or ``torchrun ... X.py``; else None."""
    words = shlex.split(text, comments=True)
    while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
        words.pop(0)  # environment assignments: OMP_NUM_THREADS=1 python ...
    if not words:
        return None
    if words[0] in ("python", "python3") and len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    if words[0] == "torchrun":
        for i, word in enumerate(words[1:], start=1):
            if word.endswith(".py") and not word.startswith("-"):
                return word, words[i + 1:]
    return None


def commands_of(path: Path) -> list[Command]:
    found = []
    for start, lines in fenced_blocks(path.read_text()):
        for line, text in logical_lines(start, lines):
            parsed = script_command(text)
            if parsed:
                found.append(Command(path, line, text.strip(), *parsed))
    return found


def unquoted_specials(text: str) -> set[str]:
    """Shell-special characters of ``text`` outside quotes and comments."""
    bare = re.sub(r"'[^']*'|\"[^\"]*\"", "", text)
    bare = re.split(r"(?:^|\s)#", bare, maxsplit=1)[0]
    return set(bare) & SHELL_SPECIAL


ALL_COMMANDS = [c for path in doc_files() for c in commands_of(path)]


# ------------------------------------------------------------------------ links


def headings(path: Path) -> set[str]:
    """GitHub's anchors of the Markdown headings of ``path`` (outside code blocks)."""
    anchors, fenced = set(), False
    for line in path.read_text().splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)):
            anchors.add(slug(m.group(1)))
    return anchors


def slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def links(path: Path) -> list[str]:
    """The link targets of ``path``'s Markdown text (outside code blocks)."""
    text, out, fenced = path.read_text(), [], False
    for line in text.splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
        elif not fenced:
            out += re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", line)
    return out


def broken_links(path: Path) -> list[str]:
    bad = []
    for target in links(path):
        if re.match(r"^[a-z]+:", target):
            continue  # http:, https:, mailto:
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            bad.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in headings(resolved):
            bad.append(f"{target}: no heading #{anchor} in {resolved.name}")
    return bad


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("script", DOCUMENTED_SCRIPTS)
def test_every_flag_is_documented(script):
    options = option_strings(script_parser(script))
    assert options, f"{script}: no options found"
    missing = undocumented(options, documentation())
    assert not missing, f"{script}: flags in no README.md or docs/*.md: {missing}"


def test_the_flag_check_sees_a_missing_flag():
    parser = argparse.ArgumentParser()
    parser.add_argument("--lamba")
    parser.add_argument("--no-such-flag-xyz")
    parser.add_argument("-b")
    text = "use `--lamba` and --batch-size; --no-such-flag-xyz-longer is another flag"
    assert undocumented(option_strings(parser), text) == ["-h", "--help", "--no-such-flag-xyz", "-b"]


def test_the_parsers_are_the_scripts_own():
    assert "--lamba" in option_strings(script_parser("train_vgg.py"))
    assert "--stage_pr" in option_strings(script_parser("prune.py"))
    assert "--out" in option_strings(script_parser("export.py"))       # built inside main()
    assert "--dry-run" in option_strings(script_parser("reproduce.py"))


def test_the_docs_show_commands():
    scripts = {c.script for c in ALL_COMMANDS}
    assert set(DOCUMENTED_SCRIPTS) <= scripts, f"no command shown for {set(DOCUMENTED_SCRIPTS) - scripts}"
    assert any(c.text.startswith("torchrun") for c in ALL_COMMANDS)


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_every_shown_command_parses(command):
    assert (ROOT / command.script).is_file(), f"{command.where}: {command.script} does not exist"
    status, err = parse_status(command.script, command.argv)
    assert status == 0, f"{command.where}: {command.text}\n  {command.script} refuses it: {err}"


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=[c.where for c in ALL_COMMANDS])
def test_every_shown_command_is_safe_to_paste(command):
    special = unquoted_specials(command.text)
    assert not special, f"{command.where}: quote {sorted(special)} in: {command.text}"


def test_the_command_checks_see_mistakes(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("text\n```bash\n# a comment\nOMP_NUM_THREADS=1 python train_vgg.py --lamda 1e-6 \\\n"
                   "    --gpu 0\npython -m venv .venv\n"
                   "python prune.py x.pt --method GReg-1 --stage_pr [0,0.5,0.5,0.5,0]\n```\n"
                   "```text\npython train_vgg.py --not-checked\n```\n")
    found = commands_of(doc)
    assert [(c.line, c.script, c.argv) for c in found] == [
        (4, "train_vgg.py", ["--lamda", "1e-6", "--gpu", "0"]),
        (7, "prune.py", ["x.pt", "--method", "GReg-1", "--stage_pr", "[0,0.5,0.5,0.5,0]"])]
    status, err = parse_status("train_vgg.py", found[0].argv)
    assert status == 2 and "--lamda" in err
    assert parse_status("train_vgg.py", ["--lamba", "1e-6", "--gpu", "0"]) == (0, "")
    assert parse_status("prune.py", found[1].argv) == (0, "")
    assert unquoted_specials(found[1].text) == {"[", "]"}
    assert not unquoted_specials("python prune.py x.pt --stage_pr '[0,0.5]' --lr_ft '{0:0.01}'  # [x]")
    assert script_command("torchrun --nproc_per_node=2 train_vgg.py --dummy") == ("train_vgg.py", ["--dummy"])
    assert script_command("python -m pytest -q") is None


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most {MAX_README_LINES}): " \
                                           f"move detail into docs/"


def test_readme_links_every_docs_page():
    pages = sorted(DOCS.glob("*.md"))
    assert pages, "no docs/*.md"
    linked = {(README.parent / t.partition("#")[0]).resolve() for t in links(README)}
    missing = [p.name for p in pages if p.resolve() not in linked]
    assert not missing, f"docs pages not linked from README.md: {missing}"


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.name)
def test_links_resolve(path):
    assert not broken_links(path), broken_links(path)


def test_the_link_check_sees_broken_links(tmp_path):
    (tmp_path / "a.md").write_text("# Title: `--x` here\n[ok](#title---x-here) [b](b.md#nope) [c](c.md) "
                                   "[web](https://example.org)\n```\n[not a link](z.md)\n```\n")
    (tmp_path / "b.md").write_text("## Some heading\n")
    assert broken_links(tmp_path / "a.md") == ["b.md#nope: no heading #nope in b.md", "c.md: no such file"]


def test_readme_keeps_the_test_command_ci_runs():
    lines = [line.strip() for _, block in fenced_blocks(README.read_text()) for line in block]
    assert lines.count(TEST_COMMAND) == 1, f"README.md must show `{TEST_COMMAND}` exactly once in a bash block"


def test_docs_point_at_nothing_a_user_lacks():
    for path in doc_files():
        text = path.read_text()
        for phrase in ("shared/spec", "spec section", "the issue's", "no published command"):
            assert phrase not in text, f"{path.relative_to(ROOT)} mentions {phrase!r}"

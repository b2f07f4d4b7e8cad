"""The README and docs/ stay true to the code: every command and option of the real parser is
documented in docs/cli.md, every ``hf-llmc ...`` line in a code block runs against the real
parser, every relative link resolves, the README stays short and links every page, and the
README's first code block holds the test command CI runs. Torch-free (the parser is)."""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import re
import shlex
from pathlib import Path

import pytest

import hf_llmc
from hf_llmc.cli.parser import build_parser
from hf_llmc.config import errors as errors_module

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
CLI_DOC = DOCS / "cli.md"
API_DOC = DOCS / "python-api.md"
DOC_FILES = sorted(DOCS.glob("*.md"))
ALL_MD = [README, *DOC_FILES]
README_MAX_LINES = 150
HELP = {"-h", "--help"}
#: Shell operators that end one command of a line (``pip install ... && hf-llmc demo ...``).
SEPARATORS = {";", "&&", "||", "|", "&"}


# -- the parser ---------------------------------------------------------------------------------------
def parser_parts() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return parser, dict(sub.choices)


def option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Option string -> action, for every option of ``parser`` (``-h`` / ``--help`` included)."""
    return {o: a for a in parser._actions for o in a.option_strings}


def documented_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for o in option_actions(parser) if o not in HELP)


def takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


# -- markdown -----------------------------------------------------------------------------------------
FENCE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")


def closes(line: str, fence: str) -> bool:
    """Whether ``line`` closes a code block opened with ``fence``."""
    text = line.strip()
    return text.startswith(fence) and not text.strip(fence[0])


def code_blocks(text: str) -> list[tuple[str, list[tuple[int, str]]]]:
    """``(language, [(line number, line), ...])`` of every fenced code block."""
    blocks, current, lang, fence = [], None, "", ""
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if current is None and match:
            current, fence, lang = [], match.group(1), match.group(2).lower()
        elif current is not None and closes(line, fence):
            blocks.append((lang, current))
            current = None
        elif current is not None:
            current.append((number, line))
    assert current is None, "unclosed code block"
    return blocks


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (where ``[x](y)`` is no link)."""
    out, inside, fence = [], False, ""
    for line in text.splitlines():
        match = FENCE.match(line)
        if not inside and match:
            inside, fence = True, match.group(1)
            continue
        if inside:
            inside = not closes(line, fence)
            continue
        out.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces -> hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a page (a repeated heading gets ``-1``, ``-2`` ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for _, _, base, _ in headings_with_raw(path):
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def headings_with_raw(path: Path) -> list[tuple[int, str, str, int]]:
    """``(level, title, anchor, line index)`` of every heading outside code blocks (the raw
    title keeps inline code, which :func:`prose` removes)."""
    lines = path.read_text().splitlines()
    code = {n - 1 for _, block in code_blocks(path.read_text()) for n, _ in block}
    fences = {i for i, line in enumerate(lines) if FENCE.match(line)}
    out = []
    for i, line in enumerate(lines):
        if i in code or i in fences:
            continue
        match = re.match(r"^(#{1,6})\s+(.*?)\s*$", line)
        if match:
            out.append((len(match.group(1)), match.group(2), slug(match.group(2)), i))
    return out


def sections(path: Path) -> dict[str, str]:
    """Anchor -> text of the section under that heading (up to the next heading of the same or a
    higher level)."""
    lines = path.read_text().splitlines()
    heads = headings_with_raw(path)
    out = {}
    for k, (level, _, anchor, start) in enumerate(heads):
        end = next((h[3] for h in heads[k + 1:] if h[0] <= level), len(lines))
        out[anchor] = "\n".join(lines[start:end])
    return out


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    return LINK.findall(prose(path.read_text()))


def mentions(text: str, word: str) -> bool:
    """Whether ``word`` occurs as a whole option / name (``--data`` is not in ``--dataset``)."""
    return re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", text) is not None


# -- command lines in code blocks ---------------------------------------------------------------------
def logical_lines(block: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Join continuation lines (a trailing backslash) into one line, keeping the first number."""
    out, pending, start = [], "", None
    for number, line in block:
        if start is None:
            start = number
        stripped = line.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        out.append((start, pending + line))
        pending, start = "", None
    if pending:
        out.append((start, pending))
    return out


def tokens(line: str) -> list[str]:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split = True
    lexer.commenters = ""
    words = list(lexer)
    cut = next((i for i, w in enumerate(words) if w.startswith("#")), len(words))  # a comment
    return words[:cut]


def invocations(line: str) -> list[list[str]]:
    """The arguments of every ``hf-llmc ...`` / ``... -m hf_llmc ...`` command in a shell line."""
    found, segment = [], []
    for word in tokens(line) + [";"]:
        if word not in SEPARATORS:
            segment.append(word)
            continue
        if "hf-llmc" in segment:
            found.append(segment[segment.index("hf-llmc") + 1:])
        else:
            for i in range(len(segment) - 1):
                if segment[i] == "-m" and segment[i + 1] == "hf_llmc":
                    found.append(segment[i + 2:])
                    break
        segment = []
    return found


def check_invocation(args: list[str]) -> list[str]:
    """What is wrong with ``hf-llmc ARGS`` (empty when the real parser accepts it).

    ``...`` stands for omitted arguments and ``[--option VALUE]`` for optional ones; their
    options are checked all the same. A line without ``...`` is parsed by the real parser."""
    parser, commands = parser_parts()
    elided = "..." in args
    words = [w for w in args if w != "..."]
    words = [w[1:] if w.startswith("[") else w for w in words]
    words = [w[:-1] if w.endswith("]") else w for w in words]
    words = [w for w in words if w]
    top = option_actions(parser)
    i = 0
    while i < len(words) and words[i].startswith("-"):
        if words[i] not in top:
            return [f"{words[i]}: not an option of hf-llmc"]
        i += 1
    if i == len(words):
        return [] if any(w in HELP for w in words) else ["no command"]
    command = words[i]
    if command not in commands:
        return [f"{command}: no such command (commands: {', '.join(commands)})"]
    actions = option_actions(commands[command])
    problems = []
    rest = words[i + 1:]
    for k, word in enumerate(rest):
        if not word.startswith("-") or re.fullmatch(r"-\d.*", word):
            continue
        name = word.split("=", 1)[0]
        if name not in actions:
            problems.append(f"{name}: not an option of hf-llmc {command}")
        elif takes_value(actions[name]) and "=" not in word and (k + 1 == len(rest) or rest[k + 1] in actions):
            problems.append(f"{name}: needs a value")
    if problems or elided:
        return problems
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parser.parse_args(words)
    except SystemExit as stop:
        if stop.code:
            return [err.getvalue().strip() or f"rejected by the parser (exit {stop.code})"]
    return []


COMMAND = re.compile(r"(?<![\w-])hf-llmc(?![\w-])|-m\s+hf_llmc(?![\w.])")


def doc_invocations() -> list[tuple[str, list[str]]]:
    out = []
    for path in ALL_MD:
        for lang, block in code_blocks(path.read_text()):
            if lang in ("python", "py", "json"):
                continue
            for number, line in logical_lines(block):
                if not COMMAND.search(line):
                    continue
                where = f"{path.relative_to(ROOT)}:{number}"
                try:
                    out += [(where, args) for args in invocations(line)]
                except ValueError as err:  # e.g. an unclosed quote
                    out.append((where, [f"<not a shell line: {err}>"]))
    return out


INVOCATIONS = doc_invocations()


# -- (a) every command and option of the parser is in docs/cli.md ----------------------------------------
def test_every_command_and_option_is_in_cli_doc():
    text = CLI_DOC.read_text()
    parser, commands = parser_parts()
    missing = [o for o in documented_options(parser) if not mentions(text, o)]
    for name, sub in commands.items():
        if not mentions(text, f"hf-llmc {name}"):
            missing.append(f"hf-llmc {name}")
        missing += [f"{name} {o}" for o in documented_options(sub) if not mentions(text, o)]
    assert missing == [], f"docs/cli.md lacks: {', '.join(missing)}"


def option_cells(text: str) -> str:
    """The first cells of the table rows in ``text`` (where an option is documented with its meaning)."""
    return "\n".join(line.split("|")[1] for line in text.splitlines()
                     if line.startswith("|") and line.count("|") >= 3)


def test_each_command_section_documents_its_options():
    """Every option of a command has a table row in the command's section of docs/cli.md, or in a
    shared section that the command's section links to."""
    found = sections(CLI_DOC)
    _, commands = parser_parts()
    missing = []
    for name, sub in commands.items():
        anchor = slug(f"hf-llmc {name}")
        assert anchor in found, f"docs/cli.md has no section '## hf-llmc {name}'"
        own = found[anchor]
        linked = [found[a] for a in re.findall(r"\]\(#([\w-]+)\)", own) if a in found and a != anchor]
        rows = option_cells("\n".join([own, *linked]))
        missing += [f"{name} {o}" for o in documented_options(sub) if not mentions(rows, o)]
    assert missing == [], f"options without a table row in their command's section of docs/cli.md: {', '.join(missing)}"


# -- (b) every hf-llmc line in a code block names a command and its options ------------------------------
def test_docs_show_command_lines():
    where = {w.split(":")[0] for w, _ in INVOCATIONS}
    assert "README.md" in where and "docs/cli.md" in where
    assert len(INVOCATIONS) >= 40, f"only {len(INVOCATIONS)} hf-llmc lines found in code blocks"
    assert any(args and args[0] == "barrier" for w, args in INVOCATIONS if "large-models" in w), \
        "the `torchrun ... -m hf_llmc barrier` line was not found"


@pytest.mark.parametrize("where,args", INVOCATIONS, ids=[w for w, _ in INVOCATIONS])
def test_command_lines_in_docs_are_accepted(where, args):
    assert check_invocation(args) == [], f"{where}: hf-llmc {' '.join(args)}"


@pytest.mark.parametrize("line,problem", [
    ("hf-llmc barrier A B --data eval.txt --bogus 1", "--bogus: not an option of hf-llmc barrier"),
    ("hf-llmc scann A B", "scann: no such command"),
    ("hf-llmc merge A B --layers attn.0 --granularity block", "--granularity: not an option of hf-llmc merge"),
    ("torchrun --nproc_per_node 2 -m hf_llmc scan ... --push-to-hub x", "--push-to-hub: not an option of"),
    ("hf-llmc merge A B --out merged/ [--push-to-hub user/name] [--privat]", "--privat: not an option"),
    ("hf-llmc barrier A B --data eval.txt --base both", "invalid choice"),
    ("hf-llmc barrier A B --data \\\n    eval.txt --layers", "--layers: needs a value"),
])
def test_the_command_line_check_catches_mistakes(line, problem):
    (_, joined), = logical_lines(list(enumerate(line.splitlines(), 1)))
    found = [p for args in invocations(joined) for p in check_invocation(args)]
    assert any(problem in p for p in found), found


def test_command_line_parsing():
    assert invocations("pip install x && hf-llmc demo --out d  # a comment --bogus") == [["demo", "--out", "d"]]
    assert invocations("accelerate launch --num_processes 2 -m hf_llmc scan A B --parallel points") == \
        [["scan", "A", "B", "--parallel", "points"]]
    assert invocations("hf auth login   # or: export HF_TOKEN=hf_...") == []


# -- (c) the README is short and links every page of docs/ ---------------------------------------------
def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines (at most {README_MAX_LINES})"


def test_readme_links_every_doc_page():
    assert DOC_FILES, "docs/ holds no pages"
    targets = {(README.parent / t.split("#")[0]).resolve() for t in links(README) if not re.match(r"\w+:", t)}
    missing = [p.name for p in DOC_FILES if p.resolve() not in targets]
    assert missing == [], f"README.md does not link docs/{', docs/'.join(missing)}"


# -- (d) every relative link resolves ----------------------------------------------------------------
def relative_links() -> list[tuple[Path, str]]:
    return [(p, t) for p in ALL_MD for t in links(p) if not re.match(r"[a-z][a-z0-9+.-]*:", t, re.I)]


@pytest.mark.parametrize("path,target", relative_links(), ids=[f"{p.name}->{t}" for p, t in relative_links()])
def test_relative_links_resolve(path, target):
    file_part, _, fragment = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    assert dest.exists(), f"{path.relative_to(ROOT)}: link to {target}: no such file"
    if fragment and dest.suffix == ".md":
        assert fragment in anchors(dest), f"{path.relative_to(ROOT)}: link to {target}: no such heading in {dest.name}"


def test_link_check_sees_links():
    assert len(relative_links()) >= 30
    assert slug("Which layers can I average? (`--auto`)") == "which-layers-can-i-average---auto"
    assert slug("hf_llmc_config.yaml") == "hf_llmc_configyaml"


# -- (e) the README's first code block holds the test command CI runs -----------------------------------
def test_readme_first_code_block_has_the_ci_test_command():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()]
    command = ci[-1]
    assert "pytest" in command, f".ci/run ends with {command!r}, not a test command"
    first = code_blocks(README.read_text())[0][1]
    assert command in [line.strip() for _, line in first], f"README.md's first code block lacks {command!r}"


# -- the Python API page names every public name and error --------------------------------------------
def test_python_api_doc_names_every_public_name():
    text = API_DOC.read_text()
    missing = [name for name in hf_llmc.__all__ if not mentions(text, name)]
    assert missing == [], f"docs/python-api.md lacks: {', '.join(missing)}"


def test_python_api_doc_lists_every_error_type():
    text = API_DOC.read_text()
    types = [name for name, obj in vars(errors_module).items()
             if inspect.isclass(obj) and issubclass(obj, errors_module.HfLlmcError)]
    assert len(types) > 10
    missing = [name for name in types if not mentions(text, name)]
    assert missing == [], f"docs/python-api.md lacks the error types: {', '.join(missing)}"

"""The examples users copy: every `fleetid ...` line in README.md's shell blocks and in
each command's --help, and README's walkthrough (the one block marked to run).

An example is a command line, joined over its backslash continuations, up to a `#`
comment or a pipe.  `parse()` resolves it against the real click tree without running
it: the sub-command path must exist, every option must exist and take the value it is
given, required arguments must be there.  A missing *file* is not a parse failure (the
example names a file the reader has), any other bad parameter is.
"""

import os
import re
import shlex

import click

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")

# The README block the walkthrough test runs: the fenced block right after this marker.
WALKTHROUGH_MARK = "<!-- walkthrough: run as written by tests/cli/test_examples.py -->"

_FENCE = re.compile(r"^```(\w*)\s*$")
_ENV_ASSIGN = re.compile(r"^[A-Z][A-Z0-9_]*=\S*$")
# What an example leaves for the reader to fill in: `<64 hex digits>`, `$(sha256sum f)`.
_PLACEHOLDER = re.compile(r"<[A-Za-z0-9][^<>]*>|\$\([^()]*\)")


def join_continuations(lines):
    """Yield logical lines: a line ending in a backslash continues on the next."""
    pending = ""
    for raw in lines:
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        yield (pending + line.strip()).strip()
        pending = ""
    if pending:
        yield pending.strip()


def command_of(logical_line):
    """The `fleetid` command in a logical shell line, as argv, or None.

    Leading VAR=value assignments are dropped; the command ends at an unquoted `#`
    comment, pipe, `;`, `&&`, `&` or redirection.
    """
    logical_line = _PLACEHOLDER.sub("PLACEHOLDER", logical_line)
    try:
        lexer = shlex.shlex(logical_line, posix=True, punctuation_chars="|;&<>")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        tokens = list(lexer)
    except ValueError:
        return None
    while tokens and _ENV_ASSIGN.match(tokens[0]):
        tokens.pop(0)
    if not tokens or tokens[0] != "fleetid":
        return None
    argv = []
    for token in tokens[1:]:
        if token and set(token) <= set("|;&<>"):
            break
        argv.append(token)
    return argv


def readme_blocks(text=None):
    """(language, first line number, lines) of every fenced block in README.md."""
    if text is None:
        with open(README, encoding="utf-8") as f:
            text = f.read()
    blocks, current, lang, start = [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        match = _FENCE.match(line)
        if match and current is None:
            current, lang, start = [], match.group(1), number + 1
        elif line.strip() == "```" and current is not None:
            blocks.append((lang, start, current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def readme_examples():
    """(where, argv) for each `fleetid` command in README's sh blocks."""
    out = []
    for lang, start, lines in readme_blocks():
        if lang not in ("sh", "bash", "console"):
            continue
        for line in join_continuations(lines):
            argv = command_of(line)
            if argv is not None:
                out.append(("README.md:%d" % start, argv))
    return out


def walkthrough():
    """The shell text of README's walkthrough block."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    at = text.find(WALKTHROUGH_MARK)
    if at < 0:
        raise LookupError("README.md has no walkthrough marker " + WALKTHROUGH_MARK)
    lang, _start, lines = readme_blocks(text[at:])[0]
    return "\n".join(lines) + "\n"


def walk_commands(group, path=("fleetid",)):
    """(path, command) for every command below `group`, groups included."""
    yield path, group
    if isinstance(group, click.Group):
        for name in sorted(group.commands):
            yield from walk_commands(group.commands[name], path + (name,))


def help_examples(root):
    """(where, argv) for each `fleetid` line in each command's help text."""
    out = []
    for path, command in walk_commands(root):
        text = command.help or ""
        lines = [line for line in text.splitlines() if line.strip() != "\b"]
        for line in join_continuations(lines):
            argv = command_of(line)
            if argv is not None:
                out.append((" ".join(path) + " --help", argv))
    return out


def parse(root, argv):
    """Parse `fleetid ARGV` against the click tree without running it.

    Returns None when it parses, else the reason (str).
    """
    command, ctx, rest, path = root, None, list(argv), ["fleetid"]
    while isinstance(command, click.Group):
        ctx = click.Context(command, info_name=path[-1], parent=ctx)
        try:
            # A group's own options (`fleetid se --bus URI info`); parsing stops at
            # the sub-command's name.
            _opts, rest, _order = command.make_parser(ctx).parse_args(args=rest)
        except click.ClickException as exc:
            return "%s: %s" % (" ".join(path), exc.format_message())
        if not rest:
            return "%s needs a sub-command" % " ".join(path)
        name = rest.pop(0)
        sub = command.commands.get(name)
        if sub is None:
            return "%s has no sub-command %r" % (" ".join(path), name)
        command = sub
        path.append(name)
    try:
        command.make_context(path[-1], rest, parent=ctx)
    except click.BadParameter as exc:
        message = exc.format_message()
        if "does not exist" in message or "No such file" in message:
            return None  # a file the reader has: not what this check is about
        return "%s: %s" % (" ".join(path), message)
    except click.ClickException as exc:
        return "%s: %s" % (" ".join(path), exc.format_message())
    return None

"""docs/DEPLOY.md's shell blocks are valid shell, and every `fleetid` line in them parses
against the real click tree (as tests/cli/test_examples.py does for README.md)."""

import os
import shutil
import subprocess

from fleetid.cli.main import cli
from tests.cli import examples
from tests.conftest import require

DEPLOY_MD = os.path.join(examples.ROOT, "docs", "DEPLOY.md")


def _shell_blocks():
    with open(DEPLOY_MD, encoding="utf-8") as f:
        text = f.read()
    return [(start, lines) for lang, start, lines in examples.readme_blocks(text)
            if lang in ("sh", "bash")]


def test_every_deploy_shell_block_is_valid_bash():
    require(shutil.which("bash"), "bash")
    blocks = _shell_blocks()
    assert len(blocks) >= 8, "the extractor found too few blocks: %d" % len(blocks)
    for start, lines in blocks:
        check = subprocess.run(["bash", "-n"], input="\n".join(lines) + "\n", text=True,
                               capture_output=True, timeout=30)
        assert check.returncode == 0, "docs/DEPLOY.md:%d: %s" % (start, check.stderr)


def test_every_fleetid_line_in_deploy_parses():
    found = []
    for start, lines in _shell_blocks():
        for line in examples.join_continuations(lines):
            # `as_fleetid /opt/fleetid/bin/fleetid ...`: the command run as the service user
            line = line.strip().replace("as_fleetid /opt/fleetid/bin/fleetid", "fleetid")
            argv = examples.command_of(line)
            if argv is not None:
                found.append(("docs/DEPLOY.md:%d" % start, argv))
    assert len(found) >= 10, "the extractor found too few commands: %d" % len(found)
    failures = ["%s: fleetid %s\n    %s" % (where, " ".join(argv), reason)
                for where, argv in found
                for reason in [examples.parse(cli, argv)] if reason is not None]
    assert not failures, "examples that do not parse:\n" + "\n".join(failures)

"""The examples in README.md and in every `--help` work as written (issue 16, item 14).

Three checks:
- every `fleetid` line in README's shell blocks and in each command's --help parses
  against the real command tree (sub-commands, options, values, required arguments);
- README's walkthrough block runs as written, with bash, in an empty scratch directory:
  the factory line, its audit log, the cloud on the line's PKI with its revocation tiers,
  curl + openssl on EST, one device's agent, check-cert, a revocation;
- the --help of each command a new user starts with has an example that is a line of
  that walkthrough, so running it runs the example as written.
"""

import os
import shutil
import socket
import subprocess
import sys

import pytest

from fleetid.cli.main import cli
from tests.cli import examples
from tests.conftest import require

# Commands whose --help must have an example that the walkthrough runs as written.
RUN_BY_WALKTHROUGH = (
    "fleetid line init",
    "fleetid line run",
    "fleetid line reconcile",
    "fleetid line cloud-config",
    "fleetid revocation init",
    "fleetid revocation status",
    "fleetid cloud serve",
    "fleetid cloud check-cert",
    "fleetid revoke",
)


def _normalise(argv):
    return " ".join(argv)


def test_every_readme_and_help_example_parses():
    found = examples.readme_examples() + examples.help_examples(cli)
    assert len(found) > 60, "the extractor found too few examples: %d" % len(found)
    failures = []
    for where, argv in found:
        reason = examples.parse(cli, argv)
        if reason is not None:
            failures.append("%s: fleetid %s\n    %s" % (where, " ".join(argv), reason))
    assert not failures, "examples that do not parse:\n" + "\n".join(failures)


def test_parse_check_catches_what_fails_as_written():
    # The checker itself: a wrong option, a missing sub-command or argument, a bad value.
    assert examples.parse(cli, ["line", "run", "--out", "x", "--devices", "2"]) is None
    assert "no such option" in examples.parse(cli, ["line", "run", "--nope", "1"]).lower()
    assert "sub-command" in examples.parse(cli, ["line"])
    assert "no sub-command" in examples.parse(cli, ["line", "walk"])
    assert examples.parse(cli, ["line", "run", "--out", "x", "--devices", "many"])
    assert examples.parse(cli, ["line", "init"])  # OUT missing
    assert examples.command_of("X=1 fleetid a --b c | d # e") == ["a", "--b", "c"]
    assert examples.command_of("curl x | base64 -d") is None


def test_help_examples_of_first_commands_are_in_the_walkthrough():
    script = examples.walkthrough()
    lines = set()
    for line in examples.join_continuations(script.splitlines()):
        argv = examples.command_of(line)
        if argv is not None:
            lines.add(_normalise(argv))
    not_run = []
    by_path = dict(examples.walk_commands(cli))
    for path in RUN_BY_WALKTHROUGH:
        command = by_path[tuple(path.split())]
        own = [_normalise(argv) for _where, argv in examples.help_examples(command)]
        own = [text for text in own if ("fleetid " + text).startswith(path + " ")
               or "fleetid " + text == path]
        if not any(text in lines for text in own):
            not_run.append("%s: none of %s" % (path, own or "(no example)"))
    assert not not_run, ("commands whose --help has no example the walkthrough runs:\n"
                         + "\n".join(not_run))


def test_cloud_serve_help_curl_pipeline_is_the_walkthrough_s():
    # The pipeline that failed as written (CRLF into `base64 -d`): the one in --help is
    # the one the walkthrough runs.
    help_text = dict(examples.walk_commands(cli))[("fleetid", "cloud", "serve")].help
    lines = [line for line in help_text.splitlines() if line.strip() != "\b"]
    pipelines = [line for line in examples.join_continuations(lines)
                 if line.startswith("curl ")]
    script = list(examples.join_continuations(examples.walkthrough().splitlines()))
    assert pipelines and all(p in script for p in pipelines), pipelines
    assert all("tr -d '\\r'" in p for p in pipelines)


def _ports_free(*ports):
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return port
    return None


def test_readme_walkthrough_runs_as_written(tmp_path):
    require(shutil.which("curl") and shutil.which("openssl"), "curl and openssl")
    busy = _ports_free(8443, 8444, 8446)
    if busy is not None:
        pytest.fail("port %d is in use: the walkthrough's fixed ports must be free" % busy)
    script = examples.walkthrough()
    # The wrapper only adds what a terminal gives a reader for free: stop at the first
    # failure, and end the servers the walkthrough started in the background.
    wrapped = ("set -euo pipefail\n"
               "trap 'kill $(jobs -p) 2>/dev/null; wait 2>/dev/null' EXIT\n" + script)
    env = dict(os.environ, FLEETID_KEYSTORE_PASS="walkthrough-pass-0123",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    done = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, env=env, timeout=400,
                          capture_output=True, text=True)
    out = done.stdout
    assert done.returncode == 0, (out[-4000:] + "\n--- stderr\n" + done.stderr[-4000:])
    # What the reader is told they will see, step by step.
    assert "line initialised in var/line" in out
    assert "100.00" in out  # the line's yield
    assert "OK sqlite:var/line/registry.db" in out  # audit verify
    assert "CN = fleetid Fleet Root" in out  # curl | base64 -d | openssl pkcs7
    assert "verdict: ACCEPTED" in out and "verdict: REFUSED" in out  # check-cert
    assert '"revset"' in out  # revocation status over --url

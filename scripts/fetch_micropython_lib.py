#!/usr/bin/env python3
"""Fetch micropython-lib packages the unix-port tests import, pinned by version and sha256.

The board firmware gets these through its manifest (`require("umqtt.simple")` in
boards/fleetid_manifest.py, resolved by MicroPython's build from micropython-lib); the
unix-port interpreter used by the test suite does not include them.  PyPI's uploads of
micropython-lib (e.g. micropython-umqtt.simple) are sdists without a setup.py, so `pip
download` refuses to build their metadata; this script fetches the sdist *by name* through
the package index's simple API (PEP 503 HTML / PEP 691 JSON), checks its sha256 against the
pin below, and extracts only the module files into the staging folder.  Nothing of the
package is copied into the repository.

Index: pip's own configuration (`pip config get global.index-url`, else PIP_INDEX_URL,
else https://pypi.org/simple), so a mirror configured for pip is honoured.

Usage:
    .venv/bin/python scripts/fetch_micropython_lib.py            # into var/micropython-lib
    .venv/bin/python scripts/fetch_micropython_lib.py --dest DIR
Exit status 0 when every pinned module is in place, 1 otherwise (with the reason).
"""

import argparse
import hashlib
import html.parser
import io
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import urllib.parse
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DEST = ROOT / "var" / "micropython-lib"
DEFAULT_INDEX = "https://pypi.org/simple"

# (distribution, version, sha256 of the sdist, {path in the sdist (after its top folder):
# path under dest}).  umqtt.simple 1.3.4 is the newest upload on PyPI (2017); its MQTT
# 3.1.1 client is what micropython-lib's manifest still freezes for `require("umqtt.simple")`.
PINS = [
    ("micropython-umqtt.simple", "1.3.4",
     "b6a2520239e3992c63a7de9370ee9b3d9d27819a90359c521f1c0f7ccab8d12f",
     {"umqtt/simple.py": "umqtt/simple.py"}),
]
_TIMEOUT = 60


def index_url():
    """The index pip is configured to use (PEP 503 base URL, no trailing slash)."""
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        try:
            out = subprocess.run([sys.executable, "-m", "pip", "config", "get",
                                  "global.index-url"], capture_output=True, text=True,
                                 timeout=_TIMEOUT)
            if out.returncode == 0 and out.stdout.strip():
                url = out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            url = None
    return (url or DEFAULT_INDEX).rstrip("/")


def normalise(name):
    """PEP 503 normalised project name."""
    out = []
    for ch in name.lower():
        out.append("-" if ch in "._-" else ch)
    text = "".join(out)
    while "--" in text:
        text = text.replace("--", "-")
    return text


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            href = dict(attrs).get("href")
            if href:
                self.links.append(href)


def sdist_url(index, name, version):
    """URL of `name`'s sdist for `version` on the simple index page (PEP 691 JSON or PEP
    503 HTML).  Raises: LookupError when the page has no such file."""
    page = "%s/%s/" % (index, normalise(name))
    request = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"})
    with urllib.request.urlopen(request, timeout=_TIMEOUT) as response:
        body = response.read()
        kind = response.headers.get("Content-Type", "")
    wanted = "%s-%s.tar.gz" % (name, version)
    if "json" in kind:
        for entry in json.loads(body)["files"]:
            if entry["filename"] == wanted:
                return urllib.parse.urljoin(page, entry["url"])
    else:
        parser = _Links()
        parser.feed(body.decode("utf-8", "replace"))
        for href in parser.links:
            if urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1] == wanted:
                return urllib.parse.urljoin(page, href)
    raise LookupError("%s not on %s" % (wanted, page))


def fetch(name, version, sha256, files, dest, index):
    """Download, check and extract one pinned package.  Returns: extracted paths.
    Raises: ValueError (sha256 mismatch, missing member), LookupError, OSError."""
    url = sdist_url(index, name, version)
    with urllib.request.urlopen(url, timeout=_TIMEOUT) as response:
        data = response.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ValueError("%s %s: sha256 %s, pinned %s" % (name, version, digest, sha256))
    written = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        members = {}
        for member in archive.getmembers():
            parts = member.name.split("/", 1)
            if len(parts) == 2 and member.isfile():
                members[parts[1]] = member
        for inner, target in files.items():
            member = members.get(inner)
            if member is None:
                raise ValueError("%s %s has no %s" % (name, version, inner))
            path = pathlib.Path(dest) / target
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(archive.extractfile(member).read())
            written.append(path)
    stamp = pathlib.Path(dest) / (".%s-%s.sha256" % (name, version))
    stamp.write_text(sha256 + "\n")
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", default=str(DEFAULT_DEST))
    args = parser.parse_args(argv)
    index = index_url()
    status = 0
    for name, version, sha256, files in PINS:
        stamp = pathlib.Path(args.dest) / (".%s-%s.sha256" % (name, version))
        if stamp.exists() and stamp.read_text().strip() == sha256 and all(
                (pathlib.Path(args.dest) / t).exists() for t in files.values()):
            continue
        try:
            for path in fetch(name, version, sha256, files, args.dest, index):
                print("micropython-lib: %s %s -> %s" % (name, version, path))
        except (OSError, LookupError, ValueError) as exc:
            print("micropython-lib: %s %s: %s" % (name, version, exc), file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())

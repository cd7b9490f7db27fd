"""GET /revset/delta/<n>.frd (cloud/revocation/revset_publisher.py) over HTTP: the base number is
1..20 ASCII digits, anything else a 400 that names the form, a set that is not kept a
404, and neither reaches int() or a traceback."""

import urllib.error
import urllib.request

import pytest

from fleetid.cloud.http.revocation_app import make_revocation_app
from fleetid.cloud.revocation.revset_publisher import DELTA_CONTENT_TYPE, RevsetTier
from fleetid.common import revset
from tests.cloud.cloud_support import Fleet
from tests.cloud.revset_support import revset_publisher
from tests.cloud.ocsp_support import LoopbackServer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    fleet = Fleet(tmp_path_factory.mktemp("revsetfleet"))
    devices = [fleet.provision("b42") for _ in range(2)]
    publisher = revset_publisher(fleet)
    first = revset.parse(publisher.current()).number
    cert = devices[0].identity_cert
    fleet.registry.mark_revoked(cert.serial_number, "keyCompromise",
                                issuer=cert.issuer.rfc4514_string())
    publisher.invalidate()
    fleet.clock.advance(seconds=2)
    publisher.current()
    try:
        with LoopbackServer(make_revocation_app([RevsetTier(publisher)])) as server:
            yield server, first
    finally:
        fleet.close()


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.headers["Content-Type"], resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


@pytest.mark.parametrize("name", [
    "%C2%B2.frd",              # "²": str.isdigit() says yes, int() says no
    "%D9%A3.frd",              # ARABIC-INDIC DIGIT THREE
    "1" * 5000 + ".frd",       # past int()'s 4,300-digit limit
    "1" * 21 + ".frd",         # past the bound
    ".frd", "-1.frd", "+1.frd", "%201.frd", "1_000.frd", "0x10.frd", "12.frs", "12",
])
def test_a_delta_name_that_is_not_ascii_digits_is_a_400_naming_the_form(served, name):
    server, _first = served
    status, _type, body = _get(server.url + "/revset/delta/" + name)
    assert status == 400, (status, body[:200])
    assert b"ASCII digits" in body and b"Traceback" not in body


def test_a_delta_from_a_kept_set_is_200_and_from_another_a_404(served):
    server, first = served
    status, content_type, body = _get(server.url + "/revset/delta/%d.frd" % first)
    assert status == 200 and content_type == DELTA_CONTENT_TYPE
    assert body[:4] == revset.DELTA_MAGIC
    status, _type, body = _get(server.url + "/revset/delta/%s.frd" % ("9" * 20))
    assert status == 404 and b"current.frs" in body

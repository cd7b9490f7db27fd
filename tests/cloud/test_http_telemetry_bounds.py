"""The verifier's /v1/telemetry decodes through the fleet's one bounded decoder
(common/mqttmsg.decode_document): the reported 8 KB `[[[...]]]` (a 500 before) is a typed
400 `document_limit` through cloud/http's status table, and no fuzzed body gets a 500."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(300)

JSON = {"Content-Type": "application/json"}
NESTED_8K = b"[" * 4096 + b"]" * 4096


def test_deep_nesting_is_a_400_and_the_route_still_serves(fleet, cloud):
    device = fleet.provision()
    fleet.enrol(device)
    files = device.files()
    for body in (NESTED_8K, b'{"m": ' + b"[" * 3000 + b"]" * 3000 + b"}"):
        status, _, answer = cloud.request("verifier", "POST", "/v1/telemetry", files=files,
                                          body=body, headers=JSON)
        assert status == 400 and answer.startswith(b"document_limit: nested deeper than")
    status, _, answer = cloud.request("verifier", "POST", "/v1/telemetry", files=files,
                                      body=b'{"temp": [[[21.5]]]}', headers=JSON)
    assert status == 202 and json.loads(answer) == {"accepted": 1}


bodies = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda n, o: (o * n).encode(), st.integers(1, 20000), st.sampled_from(["[", "{"])),
    st.builds(lambda n: b'{"a":' * n + b"1" + b"}" * n, st.integers(0, 3000)),
    st.recursive(st.integers() | st.text(max_size=4), lambda c: st.lists(c, max_size=3)
                 | st.dictionaries(st.text(max_size=3), c, max_size=3)).map(
                     lambda v: json.dumps(v).encode()),
)


def test_fuzzed_telemetry_bodies_never_get_a_500(fleet, cloud):
    device = fleet.provision()
    fleet.enrol(device)
    files = device.files()
    seen = set()

    @given(bodies)
    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    def post(body):
        status = cloud.request("verifier", "POST", "/v1/telemetry", files=files, body=body,
                               headers=JSON)[0]
        seen.add(status)
        assert status in (202, 400, 413), (status, body[:80])

    post()
    assert 400 in seen

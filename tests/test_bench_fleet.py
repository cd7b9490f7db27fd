"""bench/fleet.py runs end to end in a small bounded mode in the demo's environment (no
tests/, pytest or hypothesis importable): a throwaway PostgreSQL cluster, a registry
filled by COPY whose audit chain still verifies, a storm through `fleetid cloud serve
--workers 2` (nonce and re-enrolment on two connections: any worker answers either), a
`fleetid revoke --from-file` during it seen by every tier, and the --json figures
bench/report.py reads.  Needs the PostgreSQL server binaries and psycopg (skips locally
without them, fails under CI=true)."""

import json

from bench._pg_support import missing
from tests.conftest import require
from tests.test_bench_imports import BENCH, _run_without_test_extras


def test_fleet_bench_storm_and_revocation_in_a_small_run(tmp_path):
    lacking = missing()
    require(not lacking, "; ".join(lacking))
    out = tmp_path / "fleet.json"
    proc = _run_without_test_extras(BENCH / "fleet.py", "--devices", "400", "--storm", "6",
                                    "--victims", "2", "--clients", "2", "--workers", "2",
                                    "--split-nonce",
                                    "--json", out, timeout=400)
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:])
    document = json.loads(out.read_text())
    raw = document["raw"]
    assert raw["size"]["devices"] == 400 and raw["registry"]["filler"] == 400 - 1 - 6 - 2
    # every device's injection entry, the storm's issuances and the revocations: one chain
    assert raw["audit_chain"]["entries"] > 400 + 6 + 2
    storm = raw["rounds"][0]
    assert storm["done"] == 6 and storm["errors"] == 0, storm
    revocation = storm["revocation"]
    assert revocation["not_seen"] == [], revocation
    assert set(revocation["tiers_s"]) == {"verifier", "CRL", "OCSP", "compact set"}
    assert revocation["report"]["devices"] == 2 and revocation["report"]["event"] >= 1
    assert {"worker 0", "worker 1", "supervisor"} <= set(storm["cpu_share"])
    assert raw["schema"]["pending"] is False
    assert raw["revoked_query"]["revoked"] >= 2  # the victims, with and without the index
    assert "database bytes per device" in [row["name"] for row in document["figures"]]

"""deploy/backup.sh (fleetid-backup.service): a backup of a real PostgreSQL registry
restores to the same registry and audit chain, and its audit export verifies offline.

A fleet made by the cloud's own services (tests/cloud/cloud_support.Fleet: devices
provisioned, enrolled over EST, one revoked through the one writer) on a throwaway
PostgreSQL cluster (bench/_pg_support.py); the script runs as written with the unit's
environment (FLEETID_CLOUD_REGISTRY, STATE_DIRECTORY); pg_restore into a new database.
Skips locally without PostgreSQL (server and client binaries) or psycopg; fails under
CI=true.
"""

import os
import shutil
import subprocess
import sys
import time

from bench._pg_support import ThrowawayPostgres, missing
from tests.cloud.cloud_support import Fleet
from tests.conftest import require

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BACKUP = os.path.join(ROOT, "deploy", "backup.sh")


def _backup(target, env):
    return subprocess.run(["sh", BACKUP, str(target)], env=env, capture_output=True,
                          text=True, timeout=120)


def test_backup_restores_the_registry_and_its_audit_export_verifies(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec

    from fleetid.cloud.audit.verify import verify_log
    from fleetid.cloud.registry.postgres_backend import PostgresRegistry

    lacking = missing() + [t for t in ("pg_dump", "pg_restore") if not shutil.which(t)]
    require(not lacking, "; ".join(lacking))
    with ThrowawayPostgres(durable=False) as pg:
        fleet = Fleet(tmp_path / "fleet", registry_kind=PostgresRegistry(pg.uri))
        devices = [fleet.provision() for _ in range(3)]
        fleet.enrol(devices[0])
        fleet.revoke_certificate(devices[1].identity_cert, "keyCompromise", operator="t")
        head = fleet.registry.head()
        lines = list(fleet.registry.iter_audit_lines())
        fleet.close()
        state = tmp_path / "lib" / "fleetid"
        (state / "cloud").mkdir(parents=True)
        (state / "cloud" / "revocation.events").write_text("7\n")
        env = dict(os.environ, FLEETID_CLOUD_REGISTRY=pg.uri, STATE_DIRECTORY=str(state),
                   FLEETID_PYTHON=sys.executable, FLEETID_BACKUP_KEEP="1")
        done = _backup(tmp_path / "backups", env)
        assert done.returncode == 0, done.stderr
        (folder,) = (tmp_path / "backups").iterdir()
        assert {p.name for p in folder.iterdir()} == {"registry.dump", "audit.jsonl",
                                                      "state.tar.gz", "SHA256SUMS"}
        check = subprocess.run(["sha256sum", "-c", "SHA256SUMS"], cwd=folder,
                               capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        import tarfile

        with tarfile.open(folder / "state.tar.gz") as tar:
            assert "fleetid/cloud/revocation.events" in tar.getnames()
        # The export is the chain, and it verifies offline against the registry's head.
        export = (folder / "audit.jsonl").read_bytes().splitlines(keepends=True)
        assert export == lines
        unused = ec.generate_private_key(ec.SECP256R1()).public_key()  # no checkpoints
        assert verify_log(export, unused, unused, expected_count=head[0],
                          expected_head=head[1]).entries == len(lines)
        # Restore into a new database: the same devices, certificates and chain head.
        import psycopg

        with psycopg.connect(pg.uri, autocommit=True) as conn:
            conn.execute("CREATE DATABASE restored")
        restored_uri = pg.uri.replace("/fleet?", "/restored?")
        restore = subprocess.run(["pg_restore", "--no-owner", "--dbname", restored_uri,
                                  str(folder / "registry.dump")], capture_output=True,
                                 text=True, timeout=120)
        assert restore.returncode == 0, restore.stderr
        restored = PostgresRegistry(restored_uri)
        try:
            assert restored.head() == head
            assert list(restored.iter_audit_lines()) == lines
            assert restored.get_device(devices[1].serial).status == "revoked"
            assert len(restored.certificates(devices[0].serial)) == 2
        finally:
            restored.close()
        # Pruning keeps the newest FLEETID_BACKUP_KEEP backups.
        time.sleep(1.1)
        assert _backup(tmp_path / "backups", env).returncode == 0
        assert [p for p in (tmp_path / "backups").iterdir()] != [folder]
        assert len(list((tmp_path / "backups").iterdir())) == 1

#!/bin/sh
# fleetid backup: run by fleetid-backup.service (installed as /opt/fleetid/libexec/
# fleetid-backup), or by hand as the fleetid user:
#     sudo -u fleetid env FLEETID_CLOUD_REGISTRY=... /opt/fleetid/libexec/fleetid-backup DIR
# Writes DIR/<UTC time>/:
#   registry.dump   pg_dump --format=custom of the registry: devices, certificates,
#                   revocations, rotation state and the audit chain (restore: pg_restore)
#   audit.jsonl     the audit chain as JSON lines (the form `fleetid audit verify --log` checks offline, without a database)
#   state.tar.gz    the state directory (/var/lib/fleetid: revocation events and state,
#                   revoked-CA file, witness anchor, the broker's files)
#   SHA256SUMS
# Keys are not in any of them: they stay in the HSM (back the token up with the HSM's own
# procedure).  A sqlite: registry is copied with sqlite3's online backup instead of pg_dump.
# Keeps the last $FLEETID_BACKUP_KEEP (default 14) backups in DIR.
set -eu

out=${1:?usage: fleetid-backup DIR}
state=${STATE_DIRECTORY:-/var/lib/fleetid}
registry=${FLEETID_CLOUD_REGISTRY:?FLEETID_CLOUD_REGISTRY is not set (cloud.env)}
python=${FLEETID_PYTHON:-/opt/fleetid/bin/python}
keep=${FLEETID_BACKUP_KEEP:-14}

stamp=$(date -u +%Y%m%dT%H%M%SZ)
dir="$out/$stamp"
mkdir -p "$dir"

case "$registry" in
    postgresql:*|postgres:*)
        pg_dump --format=custom --no-owner --file="$dir/registry.dump" "$registry" ;;
    sqlite:*)
        "$python" -c 'import sqlite3, sys
src = sqlite3.connect(sys.argv[1]); dst = sqlite3.connect(sys.argv[2])
src.backup(dst); dst.close(); src.close()' "${registry#sqlite:}" "$dir/registry.db" ;;
    *)
        echo "fleetid-backup: unsupported registry URI scheme" >&2; exit 2 ;;
esac

"$python" - "$registry" "$dir/audit.jsonl" <<'PY'
import sys

from fleetid.cloud.audit.filestore import export_lines
from fleetid.cloud.registry import open_registry

registry = open_registry(sys.argv[1])
try:
    written = export_lines(registry.iter_audit_lines(), sys.argv[2])
finally:
    registry.close()
print("audit: %d entries" % written)
PY

tar -C "$(dirname "$state")" -czf "$dir/state.tar.gz" "$(basename "$state")"
(cd "$dir" && sha256sum -- * > SHA256SUMS)
echo "fleetid-backup: $dir"

# Prune: the newest $keep backups stay.
ls -1d "$out"/*/ 2>/dev/null | sort | head -n "-$keep" | while read -r old; do
    rm -rf -- "$old"
done

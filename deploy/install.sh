#!/bin/sh
# Install the fleetid cloud services as systemd units (Debian 12; needs python3-venv, and
# for the MQTT units mosquitto, for the backup postgresql-client).  Run as root, from a
# checkout or with a built wheel:
#     sudo deploy/install.sh                                 # fleetid from this checkout
#     sudo deploy/install.sh fleetid-0.1.0-py3-none-any.whl
# It puts fleetid with its PostgreSQL extra in a venv at /opt/fleetid (every ExecStart runs
# /opt/fleetid/bin/fleetid), pinned by the checkout's constraints.txt; installs the units
# (fleetid-cloud, fleetid-mqtt-broker, fleetid-mqtt-cloud, fleetid-backup + its timer), the
# backup script as /opt/fleetid/libexec/fleetid-backup, the sysusers.d entry
# (/etc/sysusers.d/fleetid.conf) and applies it (user fleetid); copies cloud.toml.example
# and cloud.env.example to /etc/fleetid/ unless they exist (never overwritten; cloud.env
# mode 0600); then reloads systemd.  Re-running upgrades fleetid in place.
# Then: docs/DEPLOY.md (PostgreSQL, HSM, TLS, /etc/fleetid/*), and
#     systemctl enable --now fleetid-cloud
#
# DESTDIR=/path installs into that tree instead and leaves the running system alone
# (systemd-sysusers --root, no daemon-reload): for checking the result (the test does, then
# runs systemd-analyze verify --root on it).  FLEETID_PIP_OPTS adds pip options.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
source=${1:-$repo}
root=${DESTDIR:-}
prefix=/opt/fleetid
python=${PYTHON:-python3}
units="fleetid-cloud.service fleetid-mqtt-broker.service fleetid-mqtt-cloud.service
fleetid-backup.service fleetid-backup.timer"

if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (or set DESTDIR to install into a tree)" >&2
    exit 1
fi

echo "install.sh: fleetid[postgres] from $source into $root$prefix"
[ -x "$root$prefix/bin/python" ] || "$python" -m venv "$root$prefix"
pin=""
[ -f "$repo/constraints.txt" ] && pin="-c $repo/constraints.txt"
# shellcheck disable=SC2086  # the option strings are lists of words
"$root$prefix/bin/python" -m pip install -q $pin ${FLEETID_PIP_OPTS:-} "$source[postgres]"
[ -x "$root$prefix/bin/fleetid" ] || { echo "install.sh: no $prefix/bin/fleetid" >&2; exit 1; }

install -D -m 0755 "$here/backup.sh" "$root$prefix/libexec/fleetid-backup"
for unit in $units; do
    install -D -m 0644 "$here/$unit" "$root/etc/systemd/system/$unit"
done
install -D -m 0644 "$here/fleetid.sysusers" "$root/etc/sysusers.d/fleetid.conf"
if [ -e "$root/etc/fleetid/cloud.toml" ]; then
    echo "install.sh: keeping the existing /etc/fleetid/cloud.toml"
else
    install -D -m 0644 "$here/cloud.toml.example" "$root/etc/fleetid/cloud.toml"
fi
if [ -e "$root/etc/fleetid/cloud.env" ]; then
    echo "install.sh: keeping the existing /etc/fleetid/cloud.env"
else
    install -D -m 0600 "$here/cloud.env.example" "$root/etc/fleetid/cloud.env"
fi
install -d -m 0750 "$root/var/backups/fleetid"

if [ -n "$root" ]; then
    systemd-sysusers --root="$root" "$root/etc/sysusers.d/fleetid.conf"
    chown --reference="$root/etc/passwd" "$root/var/backups/fleetid" 2>/dev/null || true
else
    systemd-sysusers /etc/sysusers.d/fleetid.conf
    chown fleetid:fleetid /var/backups/fleetid
    systemctl daemon-reload
    echo "install.sh: now follow docs/DEPLOY.md, then: systemctl enable --now fleetid-cloud"
fi

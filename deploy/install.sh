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
# runs systemd-analyze verify --root on it).  FLEETID_PIP_OPTS adds pip options.  The steps
# it shares with boards/linux-i2c/install.sh are in install_common.sh beside it.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
source=${1:-$repo}
units="fleetid-cloud.service fleetid-mqtt-broker.service fleetid-mqtt-cloud.service
fleetid-backup.service fleetid-backup.timer"
# shellcheck source=deploy/install_common.sh
. "$here/install_common.sh"

install_require_root
install_fleetid "$source[postgres]"

install -D -m 0755 "$here/backup.sh" "$root$prefix/libexec/fleetid-backup"
for unit in $units; do
    install -D -m 0644 "$here/$unit" "$root/etc/systemd/system/$unit"
done
install -D -m 0644 "$here/fleetid.sysusers" "$root/etc/sysusers.d/fleetid.conf"
install_site_file "$here/cloud.toml.example" /etc/fleetid/cloud.toml 0644
install_site_file "$here/cloud.env.example" /etc/fleetid/cloud.env 0600
install -d -m 0750 "$root/var/backups/fleetid"

install_sysusers /etc/sysusers.d/fleetid.conf
if [ -n "$root" ]; then
    chown --reference="$root/etc/passwd" "$root/var/backups/fleetid" 2>/dev/null || true
else
    chown fleetid:fleetid /var/backups/fleetid
fi
install_reload_systemd
[ -n "$root" ] || echo "install.sh: now follow docs/DEPLOY.md, then: systemctl enable --now fleetid-cloud"

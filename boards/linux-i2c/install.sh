#!/bin/sh
# Install the fleetid device agent as a systemd service on a Linux board (Debian, Raspberry
# Pi OS; needs python3-venv).  Run as root, from a checkout or with a built wheel:
#     sudo boards/linux-i2c/install.sh                       # fleetid from this checkout
#     sudo boards/linux-i2c/install.sh fleetid-0.1.0-py3-none-any.whl
# It puts fleetid in a venv at /opt/fleetid (ExecStart runs /opt/fleetid/bin/fleetid),
# pinned by the checkout's constraints.txt; installs fleetid-agent.service and the
# sysusers.d entry (/etc/sysusers.d/fleetid-agent.conf) and applies it (user fleetid-agent,
# member of i2c); copies agent.env.example to /etc/fleetid/agent.env unless that exists
# (never overwritten); then reloads systemd.  Re-running upgrades fleetid in place.
# Then: edit /etc/fleetid/agent.env and `systemctl enable --now fleetid-agent`.
#
# DESTDIR=/path installs into that tree instead and leaves the running system alone
# (systemd-sysusers --root, no daemon-reload): for checking the result (the test does,
# then runs systemd-analyze verify --root on it).  A venv is not relocatable, so such a
# tree is for inspection, not for copying to a board.  FLEETID_PIP_OPTS adds pip options
# (e.g. --no-index --find-links DIR on a board without network).  The steps it shares with
# the cloud's deploy/install.sh are in deploy/install_common.sh (so run it from a checkout).
set -eu

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
source=${1:-$repo}
# shellcheck source=deploy/install_common.sh
. "$repo/deploy/install_common.sh"

install_require_root
install_fleetid "$source"

install -D -m 0644 "$here/fleetid-agent.service" "$root/etc/systemd/system/fleetid-agent.service"
install -D -m 0644 "$here/fleetid-agent.sysusers" "$root/etc/sysusers.d/fleetid-agent.conf"
install_site_file "$here/agent.env.example" /etc/fleetid/agent.env 0644

install_sysusers /etc/sysusers.d/fleetid-agent.conf
install_reload_systemd
[ -n "$root" ] || echo "install.sh: now edit /etc/fleetid/agent.env, then: systemctl enable --now fleetid-agent"

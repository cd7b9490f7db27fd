# The steps deploy/install.sh (the cloud services) and boards/linux-i2c/install.sh (the
# device agent) share.  Sourced, not run (POSIX sh): the caller sets `repo` (the checkout,
# whose constraints.txt pins the install) and `set -eu` first.  Sets root (DESTDIR, empty
# for the running system), prefix (/opt/fleetid) and python (PYTHON, default python3).
root=${DESTDIR:-}
prefix=/opt/fleetid
python=${PYTHON:-python3}

# Refuse to touch the running system unless root.
install_require_root() {
    if [ -z "$root" ] && [ "$(id -u)" != 0 ]; then
        echo "install.sh: run as root (or set DESTDIR to install into a tree)" >&2
        exit 1
    fi
}

# install_fleetid SPEC: fleetid from SPEC (a checkout or wheel, with any [extra]) into the
# venv at $prefix (created if missing), pinned by constraints.txt; FLEETID_PIP_OPTS adds
# pip options.  Fails unless $prefix/bin/fleetid is there afterwards.
install_fleetid() {
    echo "install.sh: fleetid from $1 into $root$prefix"
    [ -x "$root$prefix/bin/python" ] || "$python" -m venv "$root$prefix"
    pin=""
    [ -f "$repo/constraints.txt" ] && pin="-c $repo/constraints.txt"
    # shellcheck disable=SC2086  # the option strings are lists of words
    "$root$prefix/bin/python" -m pip install -q $pin ${FLEETID_PIP_OPTS:-} "$1"
    [ -x "$root$prefix/bin/fleetid" ] || { echo "install.sh: no $prefix/bin/fleetid" >&2; exit 1; }
}

# install_site_file SOURCE TARGET MODE: copy a site settings example to TARGET (an absolute
# path on the running system) unless TARGET exists: an existing one is never overwritten.
install_site_file() {
    if [ -e "$root$2" ]; then
        echo "install.sh: keeping the existing $2"
    else
        install -D -m "$3" "$1" "$root$2"
    fi
}

# install_sysusers CONF: apply the sysusers.d entry CONF (an absolute path on the running
# system), inside $root when installing into a tree.
install_sysusers() {
    if [ -n "$root" ]; then
        systemd-sysusers --root="$root" "$root$1"
    else
        systemd-sysusers "$1"
    fi
}

# Reload systemd's units, on the running system only.
install_reload_systemd() {
    [ -n "$root" ] || systemctl daemon-reload
}

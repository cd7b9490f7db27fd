#!/usr/bin/env bash
# The quick-start demo: set up, then run the most complete flow fleetid has today.
#   1. chip fab: an SE-vendor CA and a chip (UID, MAK + certificate, SCP03 transport keys)
#   2. the emulator serves the chip on a Unix socket, speaking GlobalPlatform T=1'
#      with an SE050-class latency profile
#   3. the device-side SE client talks to it over the link: info, key generation inside
#      the SE, signing, attestation, SCP03 with the transport keys, counters, data objects.
# Everything it writes goes to var/demo/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

work=var/demo
rm -rf "$work" && mkdir -p "$work"
sock="$PWD/$work/se.sock"
bus="sim:unix:$sock"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "chip fab: vendor CA and one chip"
fleetid sim fab --vendor-dir "$work/vendor" --out "$work/chip.nvm"

step "serve the chip over T=1' (SE050-class latency) on $sock"
fleetid sim serve --nvm "$work/chip.nvm" --listen "unix:$sock" --latency se050 &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
# Bounded wait for the socket (10 s); stop with a clear message if the server died.
for _ in $(seq 200); do
    [ -S "$sock" ] && break
    kill -0 "$server" 2>/dev/null || { echo "demo: the emulator exited" >&2; exit 1; }
    sleep 0.05
done
[ -S "$sock" ] || { echo "demo: no socket at $sock after 10 s" >&2; exit 1; }

step "SE info (GET DATA over the link)"
fleetid se --bus "$bus" info
step "generate a P-256 key inside the SE, slot 2"
fleetid se --bus "$bus" genkey --slot 2 --usage sign
step "sign a digest inside the SE and verify it in the SE"
digest=$(printf 'hello fleet' | sha256sum | cut -d' ' -f1)
sig=$(fleetid se --bus "$bus" sign --slot 2 --digest "$digest")
echo "signature (DER): $sig"
fleetid se --bus "$bus" verify --slot 2 --digest "$digest" --signature "$sig"
step "attest the key with the manufacturer attestation key"
fleetid se --bus "$bus" attest --slot 2 --nonce "$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
step "SCP03 secure channel with the transport keys (security level 0x33)"
fleetid se --bus "$bus" scp03-check --fab-record "$work/chip.json" --level 0x33
step "monotonic counter and an atomic data object"
fleetid se --bus "$bus" counter increment --id 0
fleetid se --bus "$bus" data write --id 1 --hex "$(printf 'rotation-journal-v1' | od -An -tx1 | tr -d ' \n')"
fleetid se --bus "$bus" data read --id 1
fleetid se --bus "$bus" counter read --id 0
step "done: the chip's NVM is $work/chip.nvm; its fab record (SCP03 transport keys, mode 0600) is $work/chip.json"

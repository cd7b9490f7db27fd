#!/usr/bin/env bash
# The quick-start demo: set up, then run the full device lifecycle as far as fleetid is
# built, on the embedded defaults (SQLite registry, software keystore, emulated SEs):
#   1. factory line: an SE vendor (its CA key and the chips' transport keys in its own
#      folder, var/demo/se-vendor) fabs a lot of chips and ships their transport keys
#      wrapped for the line's HSM; the line (HSM custody, root key ceremony, batch CA)
#      personalises them on 2 parallel stations; HTML report
#   2. the line's hash-chained audit log is verified offline
#   3. the fleet cloud (EST CA + mTLS verifier) starts on 127.0.0.1 on the line's PKI
#   4. one shipped device, its keys in its emulated SE (served over T=1' with SE050-class
#      latency), says who-am-I to the verifier over mTLS signed in the SE; its agent
#      (`fleetid agent run`) enrols an operational certificate and rotates it over EST (new
#      key in a spare SE slot, attested with a fresh CA nonce, CSR signed in the SE,
#      authenticated by its current certificate, acknowledged, the old key deleted), its
#      progress journaled in the SE
#   5. independent clients: curl + openssl read the CA certificates; an `openssl req`
#      software-key CSR is refused for lack of attestation; `fleetid cloud check-cert`
#      explains the device certificate; then MQTT (scripts/demo_mqtt.py): a mosquitto
#      broker on the fleet PKI (mTLS, CRL file, per-device ACL), the device's SE-keyed
#      session, telemetry, retained CRLs, and an SCP03 key rotation the device relays
#   6. the device is revoked; its next connection is refused with the reason
# Everything it writes goes to var/demo/ (git-ignored; FLEETID_DEMO_DIR overrides, and is
# wiped first).  FLEETID_DEMO_SKIP_SETUP=1 skips scripts/setup.sh (the venv must exist).
# Exits non-zero on any failure; the servers it starts are stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${FLEETID_DEMO_SKIP_SETUP:-0}" != 1 ]; then
    scripts/setup.sh
fi
export PATH="$PWD/.venv/bin:$PATH"
py="$PWD/.venv/bin/python"

work="${FLEETID_DEMO_DIR:-$PWD/var/demo}"
case "$work" in
    /*/*) ;;
    *) echo "demo: FLEETID_DEMO_DIR must be an absolute path below /" >&2; exit 2 ;;
esac
rm -rf "$work" && mkdir -p "$work"
line="$work/line"
# The soft keystore's passphrase: fleetid takes it from FLEETID_KEYSTORE_PASS (or a prompt,
# or a file named with --keystore-pass-file) and never stores it beside the keystore.  The
# demo makes one up and keeps it in its work folder, outside the line directory.
if [ -z "${FLEETID_KEYSTORE_PASS:-}" ]; then
    (umask 077 && "$PWD/.venv/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))' \
        >"$work/keystore-passphrase")
    FLEETID_KEYSTORE_PASS=$(cat "$work/keystore-passphrase")
    echo "demo: keystore passphrase generated into ${work#$PWD/}/keystore-passphrase" \
        "(demo only: production supplies it by environment or prompt)"
fi
export FLEETID_KEYSTORE_PASS
cloud="$work/cloud"
sock="$work/se.sock"
bus="sim:unix:$sock"

pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
fail() { echo "demo: $*" >&2; exit 1; }
# wait_for DESCRIPTION PID TEST...: poll TEST for up to 20 s while PID lives.
wait_for() {
    local what=$1 pid=$2
    shift 2
    for _ in $(seq 400); do
        "$@" && return 0
        kill -0 "$pid" 2>/dev/null || fail "$what exited (see its log in $work)"
        sleep 0.05
    done
    fail "no $what after 20 s"
}

step "1. chip fab + factory line: 4 chips personalised on 2 parallel stations (SE050-class latency)"
# The simulated SE vendor keeps its keys in its own folder; the line gets its root
# certificate and a shipment of transport keys wrapped for the line's HSM.
fleetid line run --devices 4 --stations 2 --se-profile se050 --keep-chips \
    --vendor-dir "$work/se-vendor" --out "$line"
ls "$line"/shipments/*.json >/dev/null || fail "no wrapped transport-key shipment"
[ ! -e "$line/vendor/vendor_root.key.pem" ] || fail "the vendor's key is in the line folder"
report=$(ls "$line"/report-*.html | head -1)
[ -s "$report" ] || fail "no line report"
echo "HTML report: ${report#$PWD/}"

step "2. the line's audit log, verified offline (hash chain + signed checkpoints + the witness's anchor)"
fleetid audit verify --registry "sqlite:$line/registry.db" \
    --line-pub "$line/pki/audit-line.pub.pem" --witness-pub "$line/pki/audit-witness.pub.pem" \
    --witness-anchor "$line/witness/anchor.json"

step "3. fleet cloud: EST CA + mTLS verifier on 127.0.0.1, on the line's PKI and registry"
fleetid line cloud-config --line "$line" --out "$cloud"
# The cloud signs audit checkpoints (what EST and the verifier record) with the line's
# audit keys (the witness's in its own keystore), the witness keeping the same anchor file.
FLEETID_CLOUD_AUDIT_LINE_KEY=audit-line FLEETID_CLOUD_AUDIT_WITNESS_KEY=audit-witness \
FLEETID_CLOUD_AUDIT_WITNESS_HSM="soft:$line/witness/keystore.json;pass-env=FLEETID_KEYSTORE_PASS" \
FLEETID_CLOUD_WITNESS_ANCHOR="$line/witness/anchor.json" \
    fleetid cloud serve --config "$cloud/cloud.toml" >"$cloud/serve.out" 2>"$cloud/serve.log" &
pids+=($!)
wait_for "cloud server" "${pids[-1]}" test -s "$cloud/serve.out"
read -r verifier_port est_port < <("$py" -c '
import json, sys
ports = json.loads(open(sys.argv[1]).readline())["listening"]
print(ports["verifier"], ports["est"])' "$cloud/serve.out")
verifier="https://127.0.0.1:$verifier_port"
est="https://127.0.0.1:$est_port"
echo "verifier (mTLS, client certificate required): $verifier"
echo "EST: $est/.well-known/est"
root="$line/pki/ceremony/root.pem"

step "4. a shipped device: its chip served over T=1' (SE050-class latency)"
chip=$(ls "$line"/chips/*/se-*.nvm | head -1)
fleetid sim serve --nvm "$chip" --listen "unix:$sock" --latency se050 \
    >"$work/se.log" 2>&1 &
pids+=($!)
wait_for "SE socket" "${pids[-1]}" test -S "$sock"
fleetid se --bus "$bus" info

step "5. who-am-I over mTLS: TLS 1.3, client key in the SE (identity certificate, slot 1)"
fleetid agent whoami --bus "$bus" --cloud "$verifier" --slot 1 --save "$work/whoami.json"
serial=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["registry_serial"])' \
    "$work/whoami.json")

step "6. the device agent enrols: EST simpleenroll, first operational certificate (new key in SE slot 2)"
fleetid agent run --bus "$bus" --cloud "$verifier" --est "$est" --once
fleetid agent status --bus "$bus"
step "7. the agent rotates: EST simplereenroll authenticated by the current certificate (new key in slot 3), acknowledged, old key deleted"
fleetid agent get-cert --bus "$bus" --out "$work/previous.pem"
fleetid agent run --bus "$bus" --cloud "$verifier" --est "$est" --once --rotate
fleetid agent status --bus "$bus"
step "8. the device switched: who-am-I with the new certificate; the previous one is refused"
fleetid agent whoami --bus "$bus" --cloud "$verifier"
echo "the previous certificate (slot 2, deleted from the SE) after the acknowledgement:"
if fleetid cloud check-cert --config "$cloud/cloud.toml" "$work/previous.pem" \
        | grep -E '^(overlap|verdict)'; then
    :
fi

step "9. independent clients: curl + openssl read the EST CA certificates"
curl -sS --fail --max-time 10 --cacert "$root" \
    "https://127.0.0.1:$est_port/.well-known/est/cacerts" -o "$work/cacerts.b64"
# RFC 8951: base64 with CRLF line breaks; coreutils base64 wants them gone.
tr -d '\r' <"$work/cacerts.b64" | base64 -d | openssl pkcs7 -inform DER -print_certs -noout
step "10. a software key made by openssl req: refused for lack of SE attestation"
cn=$("$py" -c 'import json,sys; print(json.load(open(sys.argv[1]))["serial"])' \
    "$work/whoami.json")
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -keyout "$work/software.key" -subj "/CN=$cn/serialNumber=$cn" -out "$work/software.csr" \
    2>/dev/null
fleetid agent submit-csr --bus "$bus" --est "$est" --slot 1 --csr "$work/software.csr" \
    --expect-status 403
step "11. fleetid cloud check-cert: every check the verifier makes, for the device's certificate"
fleetid agent get-cert --bus "$bus" --out "$work/device.pem"
fleetid cloud check-cert --config "$cloud/cloud.toml" "$work/device.pem"

step "11b. MQTT: a broker on the fleet PKI; the device's telemetry, retained CRLs, and an SCP03 key rotation it relays without holding a key"
"$PWD/.venv/bin/python" scripts/demo_mqtt.py --line "$line" --bus "$bus" --work "$work/mqtt"

step "12. revocation: the operator revokes device $serial"
fleetid revoke --registry "sqlite:$line/registry.db" --serial "$serial" \
    --reason keyCompromise --operator demo-operator
step "13. the revoked device connects again: refused, with the reason"
if fleetid agent whoami --bus "$bus" --cloud "$verifier"; then
    fail "the revoked device was accepted"
fi
if fleetid agent run --bus "$bus" --cloud "$verifier" --est "$est" --once; then
    fail "the revoked device's agent went on"
fi
if fleetid cloud check-cert --config "$cloud/cloud.toml" "$work/device.pem" \
        | grep -E 'revocation|verdict'; then
    :
fi
echo "the revocations in the audit log (chain verified first):"
fleetid audit show --serial "$serial" --registry "sqlite:$line/registry.db" \
    --line-pub "$line/pki/audit-line.pub.pem" --witness-pub "$line/pki/audit-witness.pub.pem" \
    | grep -E '^device|revoke'

step "done: everything is in ${work#$PWD/} (line report: ${report#$PWD/})"

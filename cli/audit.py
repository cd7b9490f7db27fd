"""`fleetid audit ...`: verify the factory line's audit log offline, show one device's
entries.  A thin shell over fleetid.cloud.audit and fleetid.cloud.registry."""

import json
import os

import click

from fleetid.cli.options import open_registry


def _load_keys(paths, role):
    from fleetid.cloud import audit

    keys = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                keys.append(audit.load_public_key(f.read()))
        except (OSError, ValueError, audit.AuditError) as exc:
            raise click.ClickException("cannot load the %s public key %s: %s"
                                       % (role, path, getattr(exc, "strerror", None) or exc))
    return keys


def _at(text):
    """--at as epoch seconds (now when not given)."""
    import datetime
    import time

    if text is None:
        return time.time()
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("expected RFC 3339, e.g. 2027-01-01T00:00:00Z: %r" % text,
                                 param_hint="--at") from None
    if when.tzinfo is None:
        raise click.BadParameter("needs a time zone (e.g. Z): %r" % text, param_hint="--at")
    return when.timestamp()


def _source(log_path, registry_uri):
    if bool(log_path) == bool(registry_uri):
        raise click.UsageError("give exactly one of --log PATH or --registry URI")


def _parse_anchor(text, witness_keys):
    from fleetid.cloud import audit

    if text is None:
        return None
    if os.path.isfile(text):
        # The witness's anchor file: its signature is checked under the witness key.
        try:
            return audit.read_witness_anchor(text, witness_keys)
        except audit.AuditError as exc:
            raise click.ClickException("witness anchor %s: %s" % (text, exc)) from None
    covers, sep, head = text.partition(":")
    head = head.lower()
    if not sep or not covers.isdigit() or int(covers) < 1 or len(head) != 64 \
            or any(c not in "0123456789abcdef" for c in head):
        raise click.BadParameter("expected the witness's anchor file or COVERS:<64 hex "
                                 "digits>", param_hint="--witness-anchor")
    return int(covers), head


@click.group()
def audit():
    """The factory line's hash-chained audit log: verify it offline, show a device.

    \b
    Examples:
      fleetid audit verify --registry sqlite:line.db --line-pub line.pem --witness-pub w.pem
      fleetid audit verify --log audit.jsonl --line-pub line.pem --witness-pub w.pem \\
          --expect-count 1200
      fleetid audit show --serial 1042 --registry sqlite:line.db
    """


@audit.command()
@click.option("--log", "log_path", type=click.Path(dir_okay=False),
              help="JSON-lines audit file (an export or a line's own log).")
@click.option("--registry", "registry_uri", metavar="URI",
              help="Verify the chain stored in a registry (sqlite:PATH or postgresql://...), "
                   "against its head row.")
@click.option("--line-pub", "line_pub", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM public key (or certificate) of the line's checkpoint key; repeat for "
                   "keys rotated over the log's life.")
@click.option("--witness-pub", "witness_pub", multiple=True, required=True,
              type=click.Path(exists=True, dir_okay=False),
              help="PEM public key (or certificate) of the witness; repeatable.")
@click.option("--expect-count", type=click.IntRange(min=0, max=2**63 - 1), default=None,
              help="Entries the log must hold (e.g. the witness's latest checkpoint "
                   "'covers'); catches truncation of a file log.")
@click.option("--expect-head", default=None, metavar="HEX",
              help="Hash the last entry (or entry expect-count - 1) must have.")
@click.option("--witness-anchor", default=None, metavar="FILE|COVERS:HEX",
              help="The witness's copy of its latest checkpoint (its anchor file, e.g. "
                   "<line>/witness/anchor.json, signature checked; or COVERS:HEX): the log "
                   "must still hold that many entries, the last of them with that hash. "
                   "Catches a truncated and rewritten log.")
@click.option("--max-unanchored-age", type=click.IntRange(min=0), default=None,
              metavar="SECONDS",
              help="Fail when an entry has been left without a checkpoint for longer than "
                   "this (default: the checkpoint interval, 3600 s).")
@click.option("--max-unanchored-revocation-age", "max_urgent_age",
              type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="Fail when a revocation or CA change has been left without a checkpoint "
                   "for longer than this (default 60 s: one is due at once).")
@click.option("--at", "at_time", default=None, metavar="RFC3339",
              help="Judge that age as of this time (default: now), e.g. for an export "
                   "taken earlier: 2027-01-01T00:00:00Z.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def verify(log_path, registry_uri, line_pub, witness_pub, expect_count, expect_head,
           witness_anchor, max_unanchored_age, max_urgent_age, at_time, as_json):
    """Verify every entry, hash link and checkpoint signature of an audit log, offline.

    Prints OK with the counts, or the index (0-based) and reason of the FIRST bad entry
    and exits with status 1.  A registry's chain is also checked against the registry's
    head row (entry count and head hash), so a truncated table shows.  A file log can only
    show truncation against --expect-count / --expect-head (e.g. from the witness).
    Entries after the last checkpoint fail the log (reason unanchored) once the oldest of
    them is older than --max-unanchored-age (one hour), or a revocation or CA change
    among them older than --max-unanchored-revocation-age (60 s): a checkpoint was due
    by then (at once after a revocation, otherwise every hour), and without one those
    entries could have been cut off unseen.

    \b
    Examples:
      fleetid audit verify --registry sqlite:/var/lib/fleetid/line.db \\
          --line-pub line-checkpoint.pem --witness-pub witness.pem
      fleetid audit verify --log export-2026-11-23.jsonl --line-pub line.pem \\
          --witness-pub witness.pem --expect-count 5120 --json
      fleetid audit verify --registry sqlite:var/line/registry.db --line-pub line.pem \\
          --witness-pub w.pem --witness-anchor var/line/witness/anchor.json
      fleetid audit verify --log export.jsonl --line-pub line.pem --witness-pub w.pem \\
          --witness-anchor 5000:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    """
    from fleetid.cloud import audit as audit_log
    from fleetid.cloud.registry import RegistryError, verify_registry_log

    _source(log_path, registry_uri)
    if registry_uri and (expect_count is not None or expect_head):
        raise click.UsageError("--expect-count / --expect-head are for --log (a registry "
                               "is checked against its own head row)")
    now = _at(at_time)
    max_age = audit_log.DEFAULT_EVERY_SECONDS if max_unanchored_age is None \
        else max_unanchored_age
    max_urgent = audit_log.DEFAULT_URGENT_MAX_AGE_S if max_urgent_age is None \
        else max_urgent_age
    line_keys = _load_keys(line_pub, "line")
    witness_keys = _load_keys(witness_pub, "witness")
    anchor = _parse_anchor(witness_anchor, witness_keys)
    source = log_path or registry_uri
    try:
        if registry_uri:
            with open_registry(registry_uri, must_exist=True) as registry:
                report = verify_registry_log(registry, line_keys, witness_keys,
                                             witness_anchor=anchor)
        else:
            if not os.path.isfile(log_path):
                raise click.ClickException("no audit log at %s" % log_path)
            report = audit_log.verify_log(audit_log.read_log_file(log_path), line_keys,
                                          witness_keys, expected_count=expect_count,
                                          expected_head=expect_head, witness_anchor=anchor)
        audit_log.check_anchoring(report, now, max_age, max_urgent)
    except audit_log.AuditChainBroken as exc:
        _echo_broken(exc, source, as_json)
        raise SystemExit(1)
    except (OSError, RegistryError) as exc:
        raise click.ClickException("cannot read %s: %s" % (source, exc))
    _echo_verified(report, source, as_json)


def _echo_broken(exc, source, as_json):
    """Print the first bad entry of a log that failed verification (AuditChainBroken)."""
    if as_json:
        click.echo(json.dumps({"ok": False, "source": source, "index": exc.index,
                               "reason": exc.reason, "detail": exc.detail}))
    else:
        click.echo("FAIL %s: first bad entry %d: %s%s" % (
            source, exc.index, exc.reason, (" (%s)" % exc.detail) if exc.detail else ""))


def _echo_verified(report, source, as_json):
    """Print the report of a log that verified: counts by type, checkpoints, head."""
    if as_json:
        out = dict(vars(report))
        out.update(ok=True, source=source)
        click.echo(json.dumps(out, sort_keys=True))
        return
    kinds = ", ".join("%s %d" % (k, v) for k, v in sorted(report.by_type.items())) or "none"
    click.echo("OK %s: %d entries (%s), %d checkpoints, head %s" % (
        source, report.entries, kinds, report.checkpoints, report.head))
    if report.unanchored:
        click.echo("note: %d entries are not yet covered by a checkpoint (not yet signed "
                   "by the line and the witness)" % report.unanchored)


@audit.command()
@click.option("--serial", required=True, type=click.IntRange(min=1, max=2**63 - 1),
              help="Device serial.")
@click.option("--log", "log_path", type=click.Path(dir_okay=False), help="JSON-lines audit file.")
@click.option("--registry", "registry_uri", metavar="URI",
              help="Registry: sqlite:PATH or postgresql://...")
@click.option("--line-pub", "line_pub", multiple=True,
              type=click.Path(exists=True, dir_okay=False),
              help="With --witness-pub: verify the whole chain before showing.")
@click.option("--witness-pub", "witness_pub", multiple=True,
              type=click.Path(exists=True, dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON lines.")
def show(serial, log_path, registry_uri, line_pub, witness_pub, as_json):
    """Show when, at which station, by whom and with what attestation a device was made,
    and every later hold, revocation or reconciliation.

    Each shown entry is checked against its own hash.  With --line-pub and --witness-pub
    the whole chain is verified first; without them the output says it was not.

    \b
    Examples:
      fleetid audit show --serial 1042 --registry sqlite:/var/lib/fleetid/line.db
      fleetid audit show --serial 1042 --log export.jsonl --line-pub line.pem \\
          --witness-pub witness.pem --json
    """
    from fleetid.cloud import audit as audit_log
    from fleetid.cloud.registry import DeviceNotFound, RegistryError, verify_registry_log

    _source(log_path, registry_uri)
    if bool(line_pub) != bool(witness_pub):
        raise click.UsageError("give both --line-pub and --witness-pub, or neither")
    source = log_path or registry_uri
    device = None
    try:
        if registry_uri:
            with open_registry(registry_uri, must_exist=True) as registry:
                if line_pub:
                    verify_registry_log(registry, _load_keys(line_pub, "line"),
                                        _load_keys(witness_pub, "witness"))
                entries = registry.audit_entries_for(serial)
                try:
                    device = registry.get_device(serial)
                except DeviceNotFound:
                    device = None
        else:
            if not os.path.isfile(log_path):
                raise click.ClickException("no audit log at %s" % log_path)
            if line_pub:
                audit_log.verify_log(audit_log.read_log_file(log_path),
                                     _load_keys(line_pub, "line"),
                                     _load_keys(witness_pub, "witness"))
            entries = audit_log.show(audit_log.read_log_file(log_path), serial)
    except audit_log.AuditChainBroken as exc:
        raise click.ClickException("the audit log %s does not verify: first bad entry %d: %s"
                                   % (source, exc.index, exc.reason))
    except (OSError, RegistryError) as exc:
        raise click.ClickException("cannot read %s: %s" % (source, exc))
    if not entries:
        raise click.ClickException("no audit entries for serial %d in %s%s" % (
            serial, source, "" if line_pub else " (the chain was not verified: give "
            "--line-pub and --witness-pub)"))
    _echo_entries(entries, device, bool(line_pub), as_json)


def _echo_entries(entries, device, verified, as_json):
    """Print a device's audit entries (JSON lines as stored, or described one a line),
    after its registry record when there is one."""
    from fleetid.cloud import audit as audit_log

    if as_json:
        for entry in entries:
            click.echo(entry.line.decode("ascii"), nl=False)
        return
    if device is not None:
        click.echo("device %d: status %s, se_uid %s%s" % (
            device.serial, device.status, device.se_uid.hex(),
            (", hold reason: %s" % device.hold_reason) if device.hold_reason else ""))
    for entry in entries:
        click.echo("[%d] %s" % (entry.seq, audit_log.describe(entry)))
    if not verified:
        click.echo("note: the chain was not verified (give --line-pub and --witness-pub)")

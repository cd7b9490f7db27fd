"""`fleetid registry ...`: the registry's schema, explicitly.  A thin shell over
SqlRegistry.schema_version() / migrate() (cloud/registry/migrations.py).

A registry migrates itself when it opens on an older database; a deploy runs
`fleetid registry migrate` first instead, before it starts the workers: a migration that
adds an index locks its table against writes while it builds, and opening a registry
whose schema is current runs no DDL at all.
"""

import json
import sys

import click

from fleetid.cli.options import load_config, registry_options
from fleetid.common.errors import FleetidError


@click.group()
def registry():
    """The device registry's schema: migrate before starting the workers.

    \b
    Examples:
      fleetid registry migrate --config /etc/fleetid/cloud.toml
      fleetid registry migrate --check --registry postgresql://fleet@db/fleet
    """


def _open(uri):
    from fleetid.cloud.registry import open_registry

    try:
        return open_registry(uri, apply_schema=False)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("cannot open the registry: %s: %s"
                                   % (type(exc).__name__, exc)) from None


@registry.command("migrate")
@click.option("--check", is_flag=True,
              help="Only report; exit 1 when migrations are pending (nothing written).")
@registry_options("TOML configuration as for `fleetid cloud serve` (its registry).")
def migrate_cmd(check, registry_uri, config_path, state_dir):
    """Apply the registry's pending schema migrations; print the versions as JSON.

    \b
    One transaction under the schema lock: run it twice, or from two hosts at once, and
    the migrations run once.  {"before": 2, "after": 3, "applied": [3]}; "before" is
    null for an empty database (the schema is created).  A database newer than this
    code is refused, untouched.
    \b
    Examples:
      fleetid registry migrate --config /etc/fleetid/cloud.toml
      fleetid registry migrate --check --registry sqlite:var/cloud/registry.db
    """
    from fleetid.cloud.registry import RegistryError, migrations, schema

    uri = registry_uri or load_config(config_path, state_dir).registry
    reg = _open(uri)
    try:
        if not hasattr(reg, "migrate"):
            raise click.ClickException("%s has no schema to migrate" % uri.split(":")[0])
        before = reg.schema_version()
        if before is not None:
            migrations.check_known(before)  # newer than this fleetid: refused
        if check:
            out = {"current": before, "code": schema.SCHEMA_VERSION,
                   "pending": before != schema.SCHEMA_VERSION}
            click.echo(json.dumps(out))
            sys.exit(1 if out["pending"] else 0)
        before, after, applied = reg.migrate()
    except RegistryError as exc:
        raise click.ClickException("registry: %s" % exc) from None
    finally:
        reg.close()
    click.echo(json.dumps({"before": before, "after": after, "applied": applied}))

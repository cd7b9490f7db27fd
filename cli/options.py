"""The options and openers the CLI commands share: where the cloud's configuration, state
and registry are (`config_options`, `registry_options`), the HSM secret file
(`pass_file_option`, from hsm_secret.py), and the two calls every command makes with them
(`load_config`, `open_registry`), each turning a library error into one ClickException."""

import os

import click

from fleetid.cli.hsm_secret import pass_file_option  # noqa: F401 - shared option, one home
from fleetid.common.errors import FleetidError


def config_options(config_help="TOML configuration as for `fleetid cloud serve`."):
    """--config and --state-dir (decorator factory): the cloud's configuration."""
    def decorate(function):
        function = click.option("--state-dir", default=None,
                                help="Override [cloud] state_dir.")(function)
        return click.option("--config", "config_path",
                            type=click.Path(exists=True, dir_okay=False),
                            help=config_help)(function)
    return decorate


def registry_option(help_text="Registry URI (default: from the configuration)."):
    """--registry URI (decorator factory)."""
    return click.option("--registry", "registry_uri", default=None, help=help_text)


def registry_options(config_help, registry_help="Registry URI (default: from the "
                                                "configuration)."):
    """--config, --state-dir and --registry: where a command finds the cloud's registry."""
    def decorate(function):
        function = registry_option(registry_help)(function)
        return config_options(config_help)(function)
    return decorate


def load_config(config_path, state_dir=None, env=None, **overrides):
    """The cloud configuration (fleetid.cloud.config) from --config, the environment,
    `env` (FLEETID_CLOUD_ keys without the prefix, whose defaults derive others),
    --state-dir and the non-None `overrides` (attributes set on the result).
    Raises click.ClickException for a bad configuration."""
    from fleetid.cloud.config import ENV_PREFIX, ConfigError
    from fleetid.cloud.config import load_config as load

    environ = dict(os.environ)
    for key, value in (env or {}).items():
        environ[ENV_PREFIX + key] = value
    if state_dir:
        environ[ENV_PREFIX + "STATE_DIR"] = os.path.abspath(state_dir)
    try:
        config = load(config_path, environ)
    except ConfigError as exc:
        raise click.ClickException("config: %s" % exc) from None
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    return config


def open_registry(uri, must_exist=False):
    """The registry at `uri` (sqlite:PATH or postgresql://...).  must_exist: a SQLite
    file that is not there is an error (commands that only read), not a new registry.
    Raises click.ClickException naming the URI and the cause."""
    from fleetid.cloud.registry import open_registry as open_uri

    scheme, _sep, rest = uri.partition(":")
    if must_exist and scheme == "sqlite" and rest and not os.path.exists(rest):
        raise click.ClickException("no registry database at %s" % rest)
    try:
        return open_uri(uri)
    except (FleetidError, OSError, ValueError) as exc:
        raise click.ClickException("cannot open the registry %s: %s: %s"
                                   % (uri, type(exc).__name__, exc)) from None


def read_certificates(path, what=""):
    """Every certificate in a PEM/DER file (a bundle: leaf first).  `what` prefixes the
    error (e.g. "--chain ").  Raises click.ClickException naming the file."""
    from fleetid.cloud.verifier.service import load_certificates

    try:
        with open(path, "rb") as f:
            certs = load_certificates(f.read())
    except OSError as exc:
        raise click.ClickException("%scannot read %s: %s" % (what, path, exc.strerror)) \
            from None
    except ValueError:
        raise click.ClickException("%s%s is not a PEM/DER certificate" % (what, path)) \
            from None
    if not certs:
        raise click.ClickException("%s%s holds no certificate" % (what, path))
    return certs


BUS_HELP = ("The SE's bus: sim:unix:/path | sim:tcp:HOST:PORT | linux:i2c:/dev/i2c-N:0xADDR | "
            "linux:spi:/dev/spidevB.C  (env FLEETID_BUS)")


def bus_options(dest="bus", required=False, timeout_ms=5000, shortest_ms=100):
    """--bus (env FLEETID_BUS), --t1-profile and --timeout-ms (decorator factory): how a
    command reaches the SE.  dest: the parameter name of --bus.  timeout_ms: the default
    bound on each socket wait of the sim bus; shortest_ms: the least accepted."""
    def decorate(function):
        function = click.option(
            "--timeout-ms", default=timeout_ms, show_default=True,
            type=click.IntRange(shortest_ms, 600000),
            help="Bound on each socket wait of the sim bus.")(function)
        function = click.option(
            "--t1-profile", default="gp", show_default=True, type=click.Choice(["gp", "se05x"]),
            help="T=1' framing: GlobalPlatform, or NXP SE05x (1-byte LEN).")(function)
        return click.option("--bus", dest, envvar="FLEETID_BUS", metavar="URI", default=None,
                            required=required, help=BUS_HELP)(function)
    return decorate

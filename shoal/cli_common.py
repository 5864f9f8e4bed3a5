"""What every ``shoal`` command group shares: the error-printing click group, the operator
options, and the operator client the commands call.

Why a module of its own: :mod:`shoal.cli` (devices, artifact upload, deploy)
and :mod:`shoal.cli_rollouts` (rollout, groups, audit) both need it, and
``shoal.cli`` imports ``shoal.cli_rollouts`` to register its groups, so the
shared part cannot live in either without a cycle. It imports neither.

The operator client is :func:`shoal.opsclient.call`, imported when a command
runs: ``shoal --help`` and the offline commands never load the MQTT client.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from otaio.files import read_bounded
from otaproto.errors import LinkError, ShoalError, UsageError

PASSWORD_FILE_LIMIT_BYTES = 16 * 1024


class ShoalGroup(click.Group):
    """A click group that prints Shoal's errors as one line on stderr and exits 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ShoalError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(1)


def operator_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The options every operator command shares (also from SHOAL_* environment variables):
    ``host``, ``port``, ``operator``, ``password``, ``password_file``, ``as_json``."""
    options = [
        click.option(
            "--host",
            envvar="SHOAL_HOST",
            default="127.0.0.1",
            show_default=True,
            help="Broker address. For TLS, set SHOAL_TLS_CA to the broker's CA file.",
        ),
        click.option("--port", envvar="SHOAL_PORT", default=1883, show_default=True, type=int),
        click.option("--user", "operator", envvar="SHOAL_USER", default="admin", show_default=True),
        click.option(
            "--password",
            envvar="SHOAL_PASSWORD",
            default=None,
            help="Operator secret (or --password-file, or SHOAL_PASSWORD).",
        ),
        click.option(
            "--password-file",
            envvar="SHOAL_PASSWORD_FILE",
            default=None,
            type=click.Path(dir_okay=False, path_type=Path),
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


class Client:
    """One operator's connection settings, and the requests the commands make."""

    def __init__(
        self, host: str, port: int, operator: str, password: str | None, password_file: Path | None
    ) -> None:
        """Raises UsageError when there is no password, or the password file is not text."""
        from shoal.opsclient import OperatorLogin

        if password is None:
            if password_file is None:
                raise UsageError("give --password, --password-file or SHOAL_PASSWORD")
            data = read_bounded(password_file, PASSWORD_FILE_LIMIT_BYTES, "password file")
            try:
                password = data.decode().strip()
            except UnicodeDecodeError as exc:
                raise UsageError(f"password file {password_file} is not UTF-8 text") from exc
        ca = os.environ.get("SHOAL_TLS_CA")
        self.login = OperatorLogin(host, port, operator, password, Path(ca) if ca else None)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Client:
        """The client of a command's :func:`operator_options` values."""
        return cls(
            options["host"], options["port"], options["operator"], options["password"],
            options["password_file"],
        )  # fmt: skip

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        """One request; arguments that are None are left out.

        Raises OperatorError (a refusal) and UsageError (no orchestrator).
        """
        from shoal.opsclient import call

        try:
            return call(self.login, op, {k: v for k, v in (args or {}).items() if v is not None})
        except LinkError as exc:
            raise UsageError(f"cannot reach the orchestrator: {exc}") from exc


def print_json(result: Any) -> None:
    """A result as indented JSON, keys sorted (bytes and other odd values as text)."""
    click.echo(json.dumps(result, indent=2, sort_keys=True, default=str))


def show(result: Any, as_json: bool) -> None:
    """A result as JSON, or as one ``key=value`` line per row (nested values left out)."""
    if as_json or not isinstance(result, (dict, list)):
        print_json(result)
        return
    rows = result if isinstance(result, list) else [result]
    for row in rows:
        if isinstance(row, dict):
            click.echo(
                "  ".join(f"{k}={v}" for k, v in row.items() if not isinstance(v, (dict, list)))
            )
        else:
            click.echo(str(row))

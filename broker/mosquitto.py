"""Configuration for a production mosquitto 2.0 broker, generated from the registry's accounts.

Rules:

* Three files in one directory: ``mosquitto.conf`` (one listener, no
  anonymous access), ``passwd`` (``username:$7$...`` lines, exactly the
  registry's hashes, mode 0600) and ``acl``.
* ``passwd`` belongs to whoever mosquitto reads it as. Started as root (a
  service manager, Debian's unit), mosquitto drops to its ``user`` (default
  ``mosquitto``) *before* it reads the file, so a root-owned 0600 file stops
  it with "Unable to open pwfile". Written by root, the file is therefore
  given to that user (``run_as_user``, else ``mosquitto`` when that account
  exists); written by anyone else, it stays theirs (mosquitto started by the
  same user reads it). A persistence folder this module creates is given to
  that user the same way, since mosquitto saves its database there.
* The ACL is the policy of :mod:`otaproto.topics` (``may_publish``,
  ``may_receive``) written in mosquitto's words:

  - Gateways, who may be a million, get no lines of their own: ``pattern``
    lines with ``%u`` (the username, which is the gateway id) let each one
    write the ``up/<kind>`` topics of its own subtree and read its
    ``down/<kind>`` topics, kind by kind, as ``parse`` accepts them.
  - Pattern lines apply to *every* account, so each operator gets a
    ``user`` block that starts with ``topic deny shoal/v1/gw/#``: mosquitto
    checks an account's own lines (denials first) before any pattern, so an
    operator can never use the gateway patterns, not even for a gateway id
    equal to its own name (usernames are one namespace: the password file).
    Then the request channels of its role, write only (``channels_of``: a
    viewer ``req``; a deployer ``req`` and ``write``; an admin ``req``,
    ``write`` and ``admin``), and its response topic (read). A request on a
    channel its role lacks matches no line and is dropped: it never reaches
    the orchestrator. A role change takes effect when the file is written
    again and mosquitto reloads it (SIGHUP), like any other account change.
  - Orchestrator accounts get ``shoal/v1/#`` read and write, minus the bare
    ``shoal/v1`` topic that ``may_publish`` does not allow either.
* What mosquitto 2.0's ACL file cannot say: it does not check SUBSCRIBE at
  all. Every subscription is granted and each message is checked at delivery
  against the read rules, so what is *delivered* is exactly ``may_receive``,
  while the SUBACK is not ``may_subscribe``. A publish the ACL refuses is
  acknowledged and dropped, as MQTT 3.1.1 requires.
* Retained messages are switched off (``retain_available false``): Shoal
  never uses them, and a client that sends one is disconnected.
* ``max_queued_messages`` is raised to 100,000: mosquitto's default of 1,000
  silently drops QoS 1 messages for a slow but connected subscriber such as
  the orchestrator during a rollout (field notes §9).
* ``max_inflight_messages`` (QoS 1 messages sent to one client and not yet
  acknowledged) is raised from 20 to 1,000. The orchestrator acknowledges a
  message only once the transaction it caused has committed, and commits a
  batch at a time (``shoal serve``): with 20 in flight no batch could hold
  more than 20 messages, and every batch waited a round trip for the next.
  The window is also the orchestrator's back-pressure: what is beyond it
  waits in the broker's queue (bounded above), not in the orchestrator.
* Client ids are not tied to usernames: an account can take over the client
  id of another account's connection (MQTT's session takeover), which kicks
  that connection off. mosquitto 2.0 then starts a *clean* session for the
  new account, so queued messages are never handed to another account; the
  victim reconnects and asks for its pending work (Shoal does that on every
  connect anyway).
"""

from __future__ import annotations

import os
import pwd
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from otaproto.errors import MalformedError, UsageError
from otaproto.topics import OPERATOR_ROLES, ROOT, Channel, Down, Role, Up, channels_of, check_id

CONFIG_NAME = "mosquitto.conf"
PASSWORD_FILE_NAME = "passwd"  # noqa: S105 (a file name, not a password)
ACL_FILE_NAME = "acl"
MAX_QUEUED_MESSAGES = 100_000
MAX_INFLIGHT_MESSAGES = 1000
PERSISTENT_CLIENT_EXPIRATION = "14d"
#: The user mosquitto drops to when started as root and the config names none.
DEFAULT_BROKER_USER = "mosquitto"


@dataclass(frozen=True)
class TlsFiles:
    """A broker's certificate chain and private key, both PEM files."""

    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Account:
    """One MQTT account as the registry stores it.

    ``secret_hash`` is the mosquitto ``$7$`` string of
    :func:`otaproto.credentials.hash_secret`.
    """

    username: str
    secret_hash: str
    role: Role


def write_mosquitto_config(
    out_dir: Path,
    *,
    accounts: Sequence[Account],
    port: int,
    host: str = "127.0.0.1",
    tls: TlsFiles | None = None,
    persistence_dir: Path | None = None,
    run_as_user: str | None = None,
) -> Path:
    """Write ``mosquitto.conf``, ``passwd`` and ``acl`` into ``out_dir``; return the conf's path.

    Start the broker with ``mosquitto -c <returned path>``; after changing
    accounts, write again and send it SIGHUP (mosquitto re-reads the password
    and ACL files). Each file is replaced atomically. ``run_as_user`` writes
    mosquitto's ``user`` option: started as root, mosquitto drops to that
    user *before* it reads the password file, which is then given to that
    user when root writes it (see the module rules; tests running as root
    pass ``"root"``).

    Raises MalformedError for a username that is not a Shoal id or a hash that
    is not a ``$7$`` string, UsageError for a duplicate username, a port out
    of range, a path or host that cannot be written into the config, or (run
    as root) a ``run_as_user`` that is no account on this machine.
    """
    if not 1 <= port <= 65535:
        raise UsageError(f"mosquitto port {port} is not in 1..65535")
    seen: set[str] = set()
    for account in accounts:
        check_id(account.username, "MQTT username")
        if account.username in seen:
            raise UsageError(f"MQTT username {account.username!r} appears twice")
        seen.add(account.username)
        _check_hash(account)
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    password_file = out_dir / PASSWORD_FILE_NAME
    acl_file = out_dir / ACL_FILE_NAME
    config_file = out_dir / CONFIG_NAME

    lines = [
        "# Shoal's mosquitto 2.0 configuration, written by broker.mosquitto: do not edit by hand.",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {_value(password_file)}",
        f"acl_file {_value(acl_file)}",
        "",
        f"listener {port} {_value(host)}",
        "protocol mqtt",
    ]
    if tls is not None:
        lines += [
            f"certfile {_value(tls.cert_file.resolve())}",
            f"keyfile {_value(tls.key_file.resolve())}",
        ]
    lines += [
        "",
        "# Shoal never uses retained messages; a client that sends one is disconnected.",
        "retain_available false",
        "# The default of 1000 silently drops QoS 1 messages for a slow connected subscriber.",
        f"max_queued_messages {MAX_QUEUED_MESSAGES}",
        "# The orchestrator acknowledges after its commit: room for a whole batch in flight.",
        f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}",
        "# Persistent sessions of gateways that never come back are forgotten after this.",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        "set_tcp_nodelay true",
        "",
    ]
    owner = _broker_owner(run_as_user)
    if persistence_dir is not None:
        directory = persistence_dir.resolve()
        if not directory.exists():
            directory.mkdir(parents=True)
            if owner is not None:  # mosquitto writes its database there as its own user
                os.chown(directory, *owner)
        lines += ["persistence true", f"persistence_location {_value(directory)}/"]
    else:
        lines += ["persistence false"]
    if run_as_user is not None:
        lines += [f"user {_value(run_as_user)}"]
    lines += [
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]

    passwords = "".join(f"{a.username}:{a.secret_hash}\n" for a in accounts)
    _write(password_file, passwords, 0o600, owner=owner)
    _write(acl_file, acl_text(accounts), 0o644)
    _write(config_file, "\n".join(lines) + "\n", 0o644)
    return config_file


def acl_text(accounts: Sequence[Account]) -> str:
    """The ``acl`` file for ``accounts``: :mod:`otaproto.topics`'s policy (see the module rules)."""
    lines = [
        "# Shoal's topic ACL for mosquitto 2.0, written by broker.mosquitto from otaproto.topics.",
        "# Gateways: %u is the username, which is the gateway id.",
    ]
    lines += [f"pattern write {ROOT}/gw/%u/up/{kind.value}" for kind in Up]
    lines += [f"pattern read {ROOT}/gw/%u/down/{kind.value}" for kind in Down]
    for account in accounts:
        name = account.username
        if account.role is Role.ORCHESTRATOR:
            lines += [
                "",
                f"user {name}",
                f"topic deny {ROOT}",
                f"topic readwrite {ROOT}/#",
            ]
        elif account.role in OPERATOR_ROLES:
            allowed = channels_of(account.role)
            lines += [
                "",
                f"# operator {name}, role {account.role}: the deny line keeps the gateway"
                " patterns away from it",
                f"user {name}",
                f"topic deny {ROOT}/gw/#",
                *(f"topic write {ROOT}/ops/{name}/{c}" for c in Channel if c in allowed),
                f"topic read {ROOT}/ops/{name}/resp",
            ]
    return "\n".join(lines) + "\n"


def _check_hash(account: Account) -> None:
    parts = account.secret_hash.split("$")
    if (
        len(parts) != 5
        or parts[0]
        or parts[1] != "7"
        or any(c.isspace() or c == ":" for c in account.secret_hash)
    ):
        raise MalformedError(f"secret hash of {account.username}", "not a mosquitto $7$ hash")


def _value(value: object) -> str:
    """``value`` as one config word: mosquitto reads a line at a time."""
    text = str(value)
    if not text or any(c in text for c in "\r\n\0"):
        raise UsageError(f"{text!r} cannot be written into a mosquitto config line")
    return text


def _broker_owner(run_as_user: str | None) -> tuple[int, int] | None:
    """The (uid, gid) ``passwd`` must belong to, or None to leave it to its writer.

    Only root can give a file away, and only root-started mosquitto changes
    user. Raises UsageError when ``run_as_user`` names no account here.
    """
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(run_as_user or DEFAULT_BROKER_USER)
    except KeyError:
        if run_as_user is None:
            return None  # no 'mosquitto' account: mosquitto will stay root (and read it as root)
        raise UsageError(f"mosquitto cannot run as {run_as_user!r}: no such user") from None
    return entry.pw_uid, entry.pw_gid


def _write(path: Path, text: str, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Replace ``path`` atomically with ``text``, created with ``mode`` (and ``owner``)."""
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise

"""``gateway.toml``: who this gateway is, where its broker is, and which nodes it drives.

Example (also ``examples/gateway.toml``)::

    [gateway]
    id = "gw-lab-1"
    data_dir = "/var/lib/shoal-gateway"
    trust = ["/etc/shoal/release.pub"]

    [mqtt]
    host = "broker.example.net"
    port = 8883
    password_file = "/etc/shoal/gw-lab-1.token"   # or password = "..."
    tls_ca_file = "/etc/shoal/ca.pem"              # TLS when given

    [hooks]                       # optional: state hooks (docs/drivers-and-hooks.md)
    dir = "hooks"
    timeout_s = 60
    retry_delay_s = 60
    max_attempts = 5

    [nodes.sensor-1]
    port = "/dev/ttyUSB0"
    baud = 115200
    driver = "shoal-serial"      # any registered node driver (entry point shoal.node_drivers)

    [nodes.sensor-1.options]     # free-form, checked by the driver when it starts
    reboot_timeout_s = 120

Every problem is an InvalidInput naming the file and the key. A driver name is
checked against the registered ones without importing any driver; the options
are the driver's to check (when the node is first used), so a broken or
missing third-party driver fails only its own nodes.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway_proxy.drivers import DEFAULT_DRIVER, DriverNotFound, check_registered
from gateway_proxy.hooks import HooksConfig
from otaproto.errors import InvalidInput, MalformedError
from otaproto.topics import check_id

MAX_CONFIG_BYTES = 256 * 1024
#: The keys of a ``[nodes.NAME]`` table; a driver's own settings go in its ``options``.
NODE_KEYS = ("port", "baud", "driver", "options")
HOOK_KEYS = ("dir", "timeout_s", "retry_delay_s", "max_attempts")


@dataclass(frozen=True)
class NodePort:
    """One node behind this gateway: its port, the driver that speaks to it, and its options.

    ``port`` is anything pyserial opens (``/dev/ttyUSB0``, ``socket://host:port``);
    ``options`` is the node's ``[nodes.NAME.options]`` table, as TOML gave it.
    """

    name: str
    port: str
    baud: int = 115200
    driver: str = DEFAULT_DRIVER
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GatewayConfig:
    """Everything ``shoal gateway`` needs."""

    gateway_id: str
    data_dir: Path
    trust: tuple[Path, ...]
    mqtt_host: str
    mqtt_port: int
    password: str
    nodes: tuple[NodePort, ...]
    username: str | None = None
    tls_ca_file: Path | None = None
    fetch_window_blocks: int = 8
    hooks: HooksConfig = field(default_factory=HooksConfig)

    @property
    def mqtt_username(self) -> str:
        return self.username or self.gateway_id


def load_config(path: Path) -> GatewayConfig:
    """Read and check ``gateway.toml``. Raises InvalidInput naming what is wrong."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise InvalidInput(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
        raw = tomllib.loads(path.read_text())
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{path}: not valid TOML ({exc})") from exc
    return parse_config(raw, path)


def parse_config(raw: dict[str, Any], path: Path) -> GatewayConfig:
    """Check a parsed TOML document. Raises InvalidInput."""
    where = str(path)
    gateway = _table(raw, "gateway", where)
    mqtt = _table(raw, "mqtt", where)
    base = path.parent
    try:
        gateway_id = check_id(_str(gateway, "id", f"{where}: gateway"), "gateway.id")
    except MalformedError as exc:
        raise InvalidInput(f"{where}: {exc}") from exc
    password = mqtt.get("password")
    if password is None and "password_file" in mqtt:
        secret_path = base / _str(mqtt, "password_file", f"{where}: mqtt")
        try:
            password = secret_path.read_text().strip()
        except OSError as exc:
            raise InvalidInput(f"{where}: mqtt.password_file: {exc.strerror or exc}") from exc
    if not isinstance(password, str) or not password:
        raise InvalidInput(f"{where}: mqtt.password or mqtt.password_file is required")
    nodes = []
    for name, table in _table(raw, "nodes", where).items():
        if not isinstance(table, dict):
            raise InvalidInput(f"{where}: nodes.{name} must be a table")
        try:
            check_id(name, f"nodes.{name}")
        except MalformedError as exc:
            raise InvalidInput(f"{where}: {exc}") from exc
        nodes.append(_node(name, table, where))
    trust = gateway.get("trust", [])
    if not isinstance(trust, list) or not trust or not all(isinstance(t, str) for t in trust):
        raise InvalidInput(f"{where}: gateway.trust must list at least one public key file")
    port = mqtt.get("port", 1883)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidInput(f"{where}: mqtt.port must be 1..65535")
    ca = mqtt.get("tls_ca_file")
    return GatewayConfig(
        gateway_id=gateway_id,
        data_dir=base / _str(gateway, "data_dir", f"{where}: gateway"),
        trust=tuple(base / t for t in trust),
        mqtt_host=_str(mqtt, "host", f"{where}: mqtt"),
        mqtt_port=port,
        password=password,
        nodes=tuple(nodes),
        username=mqtt.get("username"),
        tls_ca_file=base / ca if isinstance(ca, str) else None,
        hooks=_hooks(raw.get("hooks"), base, where),
    )


def _node(name: str, table: dict[str, Any], where: str) -> NodePort:
    """One ``[nodes.NAME]`` table. Raises InvalidInput."""
    unknown = sorted(set(table) - set(NODE_KEYS))
    if unknown:
        raise InvalidInput(
            f"{where}: nodes.{name}.{unknown[0]} is not a node key ({', '.join(NODE_KEYS)}); "
            f"driver settings go in [nodes.{name}.options]"
        )
    driver = table.get("driver", DEFAULT_DRIVER)
    if not isinstance(driver, str) or not driver:
        raise InvalidInput(f"{where}: nodes.{name}.driver must be a driver name")
    try:
        check_registered(driver)
    except DriverNotFound as exc:
        raise InvalidInput(f"{where}: nodes.{name}.driver: {exc}") from exc
    baud = table.get("baud", 115200)
    if not isinstance(baud, int) or not 300 <= baud <= 20_000_000:
        raise InvalidInput(f"{where}: nodes.{name}.baud must be 300..20000000")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise InvalidInput(f"{where}: nodes.{name}.options must be a table")
    port = _str(table, "port", f"{where}: nodes.{name}")
    return NodePort(name, port, baud, driver, options)


def _hooks(raw: Any, base: Path, where: str) -> HooksConfig:
    """The optional ``[hooks]`` table. Raises InvalidInput."""
    if raw is None:
        return HooksConfig()
    if not isinstance(raw, dict):
        raise InvalidInput(f"{where}: [hooks] must be a table")
    unknown = sorted(set(raw) - set(HOOK_KEYS))
    if unknown:
        raise InvalidInput(
            f"{where}: hooks.{unknown[0]} is not a hooks key ({', '.join(HOOK_KEYS)})"
        )
    folder = base / _str(raw, "dir", f"{where}: hooks")
    if not folder.is_dir():
        raise InvalidInput(f"{where}: hooks.dir {folder} is not a folder")
    defaults = HooksConfig()
    timeout_s = _number(raw, "timeout_s", defaults.timeout_s, where)
    retry_delay_s = _number(raw, "retry_delay_s", defaults.retry_delay_s, where, minimum=0.0)
    attempts = raw.get("max_attempts", defaults.max_attempts)
    if not isinstance(attempts, int) or isinstance(attempts, bool) or not 1 <= attempts <= 1000:
        raise InvalidInput(f"{where}: hooks.max_attempts must be 1..1000")
    return HooksConfig(folder, timeout_s, retry_delay_s, attempts)


def _number(
    table: dict[str, Any], key: str, default: float, where: str, *, minimum: float = 0.001
) -> float:
    value = table.get(key, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < minimum:
        raise InvalidInput(f"{where}: hooks.{key} must be a number of seconds >= {minimum:g}")
    return float(value)


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key)
    if not isinstance(value, dict):
        raise InvalidInput(f"{where}: [{key}] table is required")
    return value


def _str(table: dict[str, Any], key: str, where: str) -> str:
    value = table.get(key)
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{where}.{key} is required (a string)")
    return value

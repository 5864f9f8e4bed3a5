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

    [nodes.sensor-1]
    port = "/dev/ttyUSB0"
    baud = 115200
    driver = "shoal-serial"

Every problem is an InvalidInput naming the file and the key.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from otaproto.errors import InvalidInput, MalformedError
from otaproto.topics import check_id

DRIVERS = ("shoal-serial",)
MAX_CONFIG_BYTES = 256 * 1024


@dataclass(frozen=True)
class NodePort:
    """One node behind this gateway: its serial port and the driver that speaks to it."""

    name: str
    port: str
    baud: int = 115200
    driver: str = "shoal-serial"


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
        driver = table.get("driver", "shoal-serial")
        if driver not in DRIVERS:
            raise InvalidInput(f"{where}: nodes.{name}.driver must be one of {', '.join(DRIVERS)}")
        baud = table.get("baud", 115200)
        if not isinstance(baud, int) or not 300 <= baud <= 20_000_000:
            raise InvalidInput(f"{where}: nodes.{name}.baud must be 300..20000000")
        nodes.append(NodePort(name, _str(table, "port", f"{where}: nodes.{name}"), baud, driver))
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
    )


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

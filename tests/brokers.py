"""Real brokers for tests: the embedded one and mosquitto, with one set of test accounts.

Every helper cleans up what it started: the embedded broker is stopped (ports
and tasks released), mosquitto is terminated by its own process id. No fixed
ports: the embedded broker binds port 0, mosquitto (which cannot report an
ephemeral port) gets a port found free by binding port 0, retried on a race.
Nothing sleeps to wait: mosquitto is up when its port accepts a connection.

There is no pytest-asyncio here: :func:`async_test` runs an ``async def``
test with ``asyncio.run``, one event loop per test.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ParamSpec

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.embedded import EmbeddedBroker, TlsFiles
from broker.mosquitto import Account, write_mosquitto_config
from otaio.mqtt import Message, MqttSettings
from otaproto.credentials import hash_secret, verify_secret
from otaproto.topics import Role
from tests.conftest import require_program

P = ParamSpec("P")

BROKER_KINDS = ("embedded", "mosquitto")
#: The accounts most tests use: two gateways, two admins, an operator of each other role,
#: the orchestrator.
FLEET: Mapping[str, Role] = {
    "gw-a": Role.GATEWAY,
    "gw-b": Role.GATEWAY,
    "op-x": Role.ADMIN,
    "op-y": Role.ADMIN,
    "op-v": Role.VIEWER,
    "op-d": Role.DEPLOYER,
    "orch": Role.ORCHESTRATOR,
}
TEST_TIMEOUT_S = 30.0
MOSQUITTO_START_TIMEOUT_S = 10.0
_client_ids = itertools.count(1)


def async_test(test: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an ``async def`` test in a fresh event loop, failing it after TEST_TIMEOUT_S."""

    @functools.wraps(test)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        async def guarded() -> None:
            async with asyncio.timeout(TEST_TIMEOUT_S):
                await test(*args, **kwargs)

        asyncio.run(guarded())

    return run


class FleetAccounts:
    """Test accounts: the secret of every account is ``secret(username)``."""

    def __init__(self, roles: Mapping[str, Role] = FLEET) -> None:
        self.roles = dict(roles)
        self.hashes = {name: hash_secret(self.secret(name)) for name in self.roles}
        self.revoked: set[str] = set()

    @staticmethod
    def secret(username: str) -> str:
        return f"secret-of-{username}"

    def authenticate(self, username: str, password: str) -> Role | None:
        if username in self.revoked or username not in self.roles:
            return None
        return self.roles[username] if verify_secret(password, self.hashes[username]) else None

    def revoke(self, username: str) -> None:
        self.revoked.add(username)

    def for_mosquitto(self) -> list[Account]:
        return [Account(name, self.hashes[name], role) for name, role in self.roles.items()]


@dataclass
class RunningBroker:
    """A started broker of either kind, and how to reach it as one of its accounts."""

    kind: str
    host: str
    port: int
    accounts: FleetAccounts
    embedded: EmbeddedBroker | None = None
    tls: TlsFiles | None = None

    def settings(
        self,
        username: str | None,
        *,
        password: str | None = None,
        client_id: str | None = None,
        **overrides: Any,
    ) -> MqttSettings:
        """Settings for ``username`` with its right secret unless ``password`` is given.

        ``username=None`` connects without credentials. Client ids are unique
        unless given, so that two clients of one account do not take each
        other over.
        """
        if username is not None and password is None:
            password = self.accounts.secret(username)
        if self.tls is not None:
            overrides.setdefault("tls_ca_file", self.tls.cert_file)
        return MqttSettings(
            self.host,
            self.port,
            client_id=client_id or f"{username or 'anonymous'}.{next(_client_ids)}",
            username=username,
            password=password,
            **overrides,
        )


@asynccontextmanager
async def running_embedded(accounts: Any, **options: Any) -> AsyncIterator[EmbeddedBroker]:
    """An EmbeddedBroker on an ephemeral port, stopped at the end."""
    async with EmbeddedBroker(accounts, **options) as broker:
        yield broker


@contextmanager
def running_mosquitto(
    tmp_path: Path,
    accounts: Sequence[Account],
    *,
    tls: TlsFiles | None = None,
    host: str = "127.0.0.1",
) -> Iterator[tuple[str, int]]:
    """mosquitto with the config of ``write_mosquitto_config``; yields ``(host, port)``.

    Skips the test on a laptop without mosquitto, fails it under CI=true.
    """
    program = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if program is None:
        program = require_program("mosquitto")
    run_as = "root" if os.geteuid() == 0 else None  # as root, mosquitto would drop to 'mosquitto'
    directory = tmp_path / "mosquitto"
    for attempt in range(5):
        port = free_port(host)
        config = write_mosquitto_config(
            directory, accounts=accounts, port=port, host=host, tls=tls, run_as_user=run_as
        )
        log_path = directory / f"mosquitto-{attempt}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [program, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT
            )
        try:
            if _wait_listening(process, host, port):
                yield host, port
                return
        finally:
            _stop_process(process)
        output = log_path.read_text(errors="replace")
        if "Address already in use" not in output:
            raise RuntimeError(f"mosquitto did not start on {host}:{port}:\n{output}")
    raise RuntimeError("mosquitto lost the race for a free port five times")


@asynccontextmanager
async def running_broker(
    kind: str, tmp_path: Path, accounts: FleetAccounts, *, tls: TlsFiles | None = None
) -> AsyncIterator[RunningBroker]:
    """A broker of ``kind`` ("embedded" or "mosquitto") serving ``accounts``."""
    if kind == "embedded":
        async with running_embedded(accounts, tls=tls) as embedded:
            yield RunningBroker(kind, embedded.host, embedded.port, accounts, embedded, tls)
    elif kind == "mosquitto":
        with running_mosquitto(tmp_path, accounts.for_mosquitto(), tls=tls) as (host, port):
            yield RunningBroker(kind, host, port, accounts, None, tls)
    else:
        raise ValueError(f"unknown broker kind {kind!r}")


async def next_message(stream: AsyncIterator[Message], timeout_s: float = 5.0) -> Message:
    """The next message of ``stream``; fails the test if none arrives within ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        return await anext(stream)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (whoever binds it next may lose a race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def self_signed_tls(directory: Path, name: str = "broker") -> TlsFiles:
    """A self-signed certificate for 127.0.0.1 and localhost; it is its own CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"shoal test {name}")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file = directory / f"{name}-cert.pem"
    key_file = directory / f"{name}-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_file.chmod(0o600)
    return TlsFiles(cert_file, key_file)


# --- a raw MQTT 3.1.1 client, for what no well-behaved library sends ------------------------

CONNACK, PUBLISH, PUBACK, SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = (
    2,
    3,
    4,
    8,
    9,
    12,
    13,
    14,
)


def mqtt_string(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def mqtt_packet(first_byte: int, body: bytes) -> bytes:
    """A packet: fixed header (with the variable-length remaining length) and body."""
    length, encoded = len(body), bytearray()
    while True:
        digit, length = length % 128, length // 128
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            break
    return bytes([first_byte]) + bytes(encoded) + body


def connect_packet(
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    will_topic: str | None = None,
    will_payload: bytes = b"",
    will_retain: bool = False,
    clean_session: bool = True,
    keepalive_s: int = 30,
) -> bytes:
    flags, payload = 0, mqtt_string(client_id)
    if clean_session:
        flags |= 0x02
    if will_topic is not None:
        flags |= 0x04 | (1 << 3) | (0x20 if will_retain else 0)  # will QoS 1
        payload += mqtt_string(will_topic) + len(will_payload).to_bytes(2, "big") + will_payload
    if username is not None:
        flags |= 0x80
        payload += mqtt_string(username)
    if password is not None:
        flags |= 0x40
        payload += mqtt_string(password)
    variable_header = mqtt_string("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big")
    return mqtt_packet(0x10, variable_header + payload)


def publish_packet(
    topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, packet_id: int = 1
) -> bytes:
    first = (PUBLISH << 4) | (qos << 1) | (1 if retain else 0)
    body = mqtt_string(topic) + (packet_id.to_bytes(2, "big") if qos else b"") + payload
    return mqtt_packet(first, body)


async def read_packet(reader: asyncio.StreamReader) -> tuple[int, int, bytes] | None:
    """``(type, flags, body)`` of the next packet, None at the end of the stream."""
    try:
        first = (await reader.readexactly(1))[0]
        length, shift = 0, 0
        while True:
            digit = (await reader.readexactly(1))[0]
            length |= (digit & 0x7F) << shift
            shift += 7
            if not digit & 0x80:
                break
        return first >> 4, first & 0x0F, await reader.readexactly(length)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None


class RawClient:
    """A hand-made MQTT connection: retained publishes, forbidden wills, abrupt ends."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(
        cls, host: str, port: int, client_id: str, **options: Any
    ) -> tuple[RawClient, int]:
        """Connect and return the client and the CONNACK return code (-1: no CONNACK)."""
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        writer.write(connect_packet(client_id, **options))
        await writer.drain()
        packet = await read_packet(reader)
        if packet is None or packet[0] != CONNACK:
            return client, -1
        return client, packet[2][1]

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read(self) -> tuple[int, int, bytes] | None:
        return await read_packet(self.reader)

    def abort(self) -> None:
        """End the connection without DISCONNECT: the broker must publish the will."""
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionError):
            await self.writer.wait_closed()


# --- process helpers ------------------------------------------------------------------------


def _wait_listening(process: subprocess.Popen[bytes], host: str, port: int) -> bool:
    """True once ``port`` accepts connections; False if ``process`` exited first."""
    deadline = time.monotonic() + MOSQUITTO_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return process.poll() is None
        except OSError:
            pass
        with suppress(subprocess.TimeoutExpired):  # a pause that ends at once if it exits
            process.wait(timeout=0.01)
    raise RuntimeError(
        f"mosquitto did not listen on {host}:{port} within {MOSQUITTO_START_TIMEOUT_S} s"
    )


def _stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

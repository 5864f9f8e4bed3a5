"""gateway.toml: the example parses, and every mistake names the file and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway_proxy.config import NodePort, load_config
from gateway_proxy.drivers import registered_drivers
from gateway_proxy.hooks import HooksConfig, survey
from otaproto.errors import InvalidInput

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.toml"
BASE = "[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\n"


def test_the_example_config_parses(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "gateway.toml")
    shutil.copytree(EXAMPLE.parent / "hooks", tmp_path / "hooks")
    (tmp_path / "gw-lab-1.secret").write_text("s3cret\n")
    config = load_config(tmp_path / "gateway.toml")
    assert config.gateway_id == "gw-lab-1"
    assert config.mqtt_username == "gw-lab-1"
    assert config.password == "s3cret"
    assert [n.name for n in config.nodes] == ["sensor-1", "sensor-2", "motor-ctl"]
    assert config.nodes[1].baud == 921600
    assert [n.driver for n in config.nodes] == ["shoal-serial", "shoal-serial", "smp"]
    assert config.nodes[0].options == {"reboot_timeout_s": 120}
    assert config.nodes[2].port == "socket://127.0.0.1:1337"
    assert config.nodes[2].options == {
        "device_type": "stm32f4-motor", "mtu": 512, "line_bytes": 128,
    }  # fmt: skip
    assert config.trust == (tmp_path / "keys/release.pub",)
    assert config.data_dir == tmp_path / "gw-lab-1-data"
    assert config.hooks == HooksConfig(tmp_path / "hooks", 60.0, 60.0, 5)


def test_the_example_hooks_are_well_named_and_executable() -> None:
    found, problems = survey(EXAMPLE.parent / "hooks")
    assert problems == []
    assert found == [
        "Commit_Leave_90_notify", "Download_Enter_10_window", "Flash_Enter_10_battery",
        "Flash_Error_90_log",
    ]  # fmt: skip


def test_an_unknown_driver_is_one_line_naming_the_registered_ones(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(BASE + "[nodes.n1]\nport='/dev/x'\ndriver='smb'\n")
    with pytest.raises(InvalidInput) as refused:
        load_config(path)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (
        f"{path}: nodes.n1.driver: no node driver 'smb' is registered "
        f"(registered: {', '.join(registered_drivers())})"
    )
    assert {"shoal-serial", "smp"} <= set(registered_drivers())


def test_driver_options_and_no_hooks_by_default(tmp_path: Path) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(
        BASE + "[nodes.m1]\nport='socket://127.0.0.1:9'\ndriver='smp'\n"
        "[nodes.m1.options]\ndevice_type='nrf52840'\nmtu=256\n"
    )
    config = load_config(path)
    assert config.nodes[0] == NodePort(
        "m1", "socket://127.0.0.1:9", 115200, "smp", {"device_type": "nrf52840", "mtu": 256}
    )
    assert config.hooks == HooksConfig()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not toml [", "not valid TOML"),
        ("[mqtt]\nhost='h'\npassword='p'\n[nodes]\n", r"\[gateway\] table is required"),
        ("[gateway]\nid='GW'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\n[nodes]\n",
         "gateway.id"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\n[nodes]\n",
         "mqtt.password or mqtt.password_file is required"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=[]\n[mqtt]\nhost='h'\npassword='p'\n[nodes]\n",
         "gateway.trust"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\n"
         "[nodes.n1]\nport='/dev/x'\ndriver='nope'\n", "nodes.n1.driver: no node driver 'nope'"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\n"
         "[nodes.n1]\nbaud=9600\n", "nodes.n1.port is required"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\nport=0\n"
         "[nodes]\n", "mqtt.port"),
        (BASE + "[nodes.n1]\nport='/dev/x'\nmtu=512\n",
         r"nodes.n1.mtu is not a node key \(port, baud, driver, options\); "
         r"driver settings go in \[nodes.n1.options\]"),
        (BASE + "[nodes.n1]\nport='/dev/x'\noptions=3\n", "nodes.n1.options must be a table"),
        (BASE + "[nodes]\n[hooks]\ndir='nowhere'\n", "hooks.dir .*nowhere is not a folder"),
        (BASE + "[nodes]\n[hooks]\ndir='.'\ntimeout_s=0\n", "hooks.timeout_s must be a number"),
        (BASE + "[nodes]\n[hooks]\ndir='.'\nmax_attempts=0\n",
         "hooks.max_attempts must be 1..1000"),
        (BASE + "[nodes]\n[hooks]\ndir='.'\nretry_s=1\n", "hooks.retry_s is not a hooks key"),
    ],
)  # fmt: skip
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message):
        load_config(path)


def test_a_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="cannot read"):
        load_config(tmp_path / "nope.toml")

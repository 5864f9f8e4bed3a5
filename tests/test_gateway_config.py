"""gateway.toml: the example parses, and every mistake names the file and the key."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gateway_proxy.config import load_config
from otaproto.errors import InvalidInput

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "gateway.toml"


def test_the_example_config_parses(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "gateway.toml")
    (tmp_path / "gw-lab-1.secret").write_text("s3cret\n")
    config = load_config(tmp_path / "gateway.toml")
    assert config.gateway_id == "gw-lab-1"
    assert config.mqtt_username == "gw-lab-1"
    assert config.password == "s3cret"
    assert [n.name for n in config.nodes] == ["sensor-1", "sensor-2"]
    assert config.nodes[1].baud == 921600
    assert config.trust == (tmp_path / "keys/release.pub",)
    assert config.data_dir == tmp_path / "gw-lab-1-data"


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
         "[nodes.n1]\nport='/dev/x'\ndriver='smp'\n", "nodes.n1.driver"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\n"
         "[nodes.n1]\nbaud=9600\n", "nodes.n1.port is required"),
        ("[gateway]\nid='g'\ndata_dir='d'\ntrust=['k']\n[mqtt]\nhost='h'\npassword='p'\nport=0\n"
         "[nodes]\n", "mqtt.port"),
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

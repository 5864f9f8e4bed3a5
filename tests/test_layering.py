"""Layering rules of the architecture that a test can hold."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IO_MODULES = {
    "socket", "_socket", "select", "selectors", "ssl", "asyncio", "subprocess", "termios",
    "pty", "serial", "paho", "amqtt", "sqlite3", "_sqlite3", "sqlite_utils",
}  # fmt: skip


def test_importing_otaproto_pulls_in_no_io_library() -> None:
    code = (
        "import importlib, pkgutil, sys, otaproto\n"
        "for m in pkgutil.iter_modules(otaproto.__path__):\n"
        "    importlib.import_module('otaproto.' + m.name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=ROOT
    ).stdout.split()
    loaded = {name.split(".")[0] for name in out}
    assert not loaded & IO_MODULES, f"otaproto imports I/O: {sorted(loaded & IO_MODULES)}"


def _imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        found |= _imports_of_file(path)
    return found


def test_components_never_import_each_other() -> None:
    components = {"broker", "orchestrator", "gateway_proxy", "mcu_firmware_stub"}
    for component in components:
        wrong = _imports(component) & (components - {component})
        assert not wrong, f"{component} imports {wrong}"
    for lower in ("otaproto", "otaio"):
        assert not _imports(lower) & (components | {"shoal"}), f"{lower} imports a component"


def test_each_io_library_is_imported_by_one_module_only() -> None:
    for library in ("paho", "serial", "amqtt"):
        users = [
            path.relative_to(ROOT).as_posix()
            for package in (
                "otaproto",
                "otaio",
                "broker",
                "orchestrator",
                "gateway_proxy",
                "mcu_firmware_stub",
                "shoal",
            )
            for path in (ROOT / package).rglob("*.py")
            if library in _imports_of_file(path)
        ]
        assert len(users) <= 1, f"{library} imported by {users}"


def _imports_of_file(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found

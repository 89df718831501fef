"""The shared POSIX checks (tests/posix_checks.py) on the vault: it must behave as
plain Linux does (tests/test_core_posix_baseline.py runs the same checks there)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import Mount
from posix_checks import CHECKS


@pytest.fixture(scope="module")
def vault_root(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("vaultposix")
    mount = Mount(root, {}, "posix checks passphrase")
    mount.root.mkdir(parents=True, exist_ok=True)
    mount.start()
    try:
        yield mount
    finally:
        try:
            mount.stop()
        except AssertionError:
            mount.kill9()


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_posix_on_the_vault(check: Callable[[Path], None], vault_root: Mount) -> None:
    directory = vault_root.path / "vault" / check.__name__
    directory.mkdir()
    check(directory)

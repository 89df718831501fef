"""The shared POSIX checks on plain Linux: the baseline that kfs's vault must match."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from posix_checks import CHECKS


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_posix_on_plain_linux(check: Callable[[Path], None], tmp_path: Path) -> None:
    check(tmp_path)

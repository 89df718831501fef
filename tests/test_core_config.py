"""Config: shipped defaults load; bad files stop with one line naming file, key and reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from kfs.config import ConfigError, load_config, parse_duration


def test_shipped_defaults_load_with_the_seed_values() -> None:
    config = load_config(None)
    assert config.vault.auto_lock_timeout == 15 * 60
    assert config.vault.kdf_iterations == 100_000
    assert config.logging.level == "info"
    assert config.logging.max_days == 30
    assert config.logging.rotate_size_mb == 100
    assert config.vectors.provider == "chroma"
    assert config.vectors.sync_interval == 30


@pytest.mark.parametrize(
    ("text", "seconds"), [("30s", 30), ("15m", 900), ("2h", 7200), ("30d", 2592000), (5, 5), ("250ms", 0.25)]
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("filename", "content", "message"),
    [
        ("logging.yaml", "levle: info\n", "logging.yaml: levle: unknown key"),
        ("logging.yaml", "max_days: thirty\n", "logging.yaml: max_days: expected a whole number"),
        ("logging.yaml", "level: loud\n", "logging.yaml: level: must be one of"),
        ("vault_config.yaml", "auto_lock_timeout: soon\n", "vault_config.yaml: auto_lock_timeout: expected a duration"),
        ("vault_config.yaml", "enabled: 1\n", "vault_config.yaml: enabled: expected true or false"),
        ("streams.yaml", "websocket: {port: -1}\n", "streams.yaml: websocket.port: cannot be negative"),
        ("logging.yaml", "level: [\n", "logging.yaml: line"),
        ("vector_config.yaml", "- a\n", "vector_config.yaml: expected a mapping"),
    ],
)
def test_bad_config_names_file_key_and_reason(tmp_path: Path, filename: str, content: str, message: str) -> None:
    (tmp_path / filename).write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value).startswith(message), str(e.value)
    assert "\n" not in str(e.value)


def test_override_dir_changes_only_the_keys_it_names(tmp_path: Path) -> None:
    (tmp_path / "logging.yaml").write_text("rotate_size_mb: 5\n")
    config = load_config(tmp_path)
    assert config.logging.rotate_size_mb == 5
    assert config.logging.max_days == 30

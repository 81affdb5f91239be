from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from thrifty.errors import ConfigError
from thrifty.settings import load_settings, resolve_secrets, settings_from_mapping
from thrifty.stores.keys import SqliteKeyStore, hash_key
from thrifty.stores.sqlite_db import MIGRATIONS, migrate, open_database

GOOD = """
providers:
  openai: {kind: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
models:
  mini: {provider: openai, upstream: gpt-4o-mini}
routes:
  chat: {model: mini, max_input_tokens: 1000}
tenants:
  acme: {}
storage: {url: "sqlite:///data/ledger.db"}
"""


def test_load_settings_anchors_relative_paths_and_reads_only_named_secrets(tmp_path: Path):
    path = tmp_path / "thrifty.yaml"
    path.write_text(GOOD)
    settings = load_settings(path)
    assert settings.storage.sqlite_path == tmp_path / "data" / "ledger.db"
    assert resolve_secrets(settings, {"OPENAI_API_KEY": "sk-1", "OTHER": "x"}) == {"openai": "sk-1"}


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda d: d["models"]["mini"].update(provider="nope"), "models.mini.provider"),
        (lambda d: d["routes"]["chat"].update(model="nope"), "routes.chat.model"),
        (lambda d: d["providers"]["openai"].pop("base_url"), "providers.openai"),
        (lambda d: d["providers"]["openai"].update(kind="azure"), "providers.openai.kind"),
        (lambda d: d["providers"]["openai"].update(timeout_s=-1), "providers.openai.timeout_s"),
        (lambda d: d["models"]["mini"].update(colour="red"), "models.mini.colour"),
        (lambda d: d["tenants"]["acme"].update(key_hashes=["abc"]), "tenants.acme.key_hashes"),
        (lambda d: d["models"]["mini"].update(price={"input_per_mtok": 1}), "models.mini.price"),
        (lambda d: d.update(idempotency={"flight_lease_s": 0}), "idempotency.flight_lease_s"),
        (lambda d: d.update(idempotency={"lease_s": 10, "flight_lease_s": 20}), "idempotency"),
    ],
)
def test_invalid_settings_name_the_field(mutate, field):
    import yaml

    data = yaml.safe_load(GOOD)
    mutate(data)
    with pytest.raises(ConfigError) as info:
        settings_from_mapping(data, source="test.yaml")
    assert field in info.value.message and "test.yaml" in info.value.message


def test_the_renewed_idempotency_lease_is_the_short_one_unless_lease_s_is_shorter():
    import yaml

    data = yaml.safe_load(GOOD)
    assert settings_from_mapping(data).idempotency.running_lease_s == 15.0
    data["idempotency"] = {"lease_s": 3}  # an older config with a short lease keeps it
    assert settings_from_mapping(data).idempotency.running_lease_s == 3.0
    data["idempotency"] = {"lease_s": 3, "flight_lease_s": 4}
    with pytest.raises(ConfigError, match=r"flight_lease_s \(4\) must not exceed idempotency.lease_s \(3\)"):
        settings_from_mapping(data)


def test_unreadable_or_non_yaml_settings(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)


def test_migrations_from_an_empty_database_and_again(tmp_path: Path):
    db = tmp_path / "fresh.db"
    conn = open_database(db)
    versions = [v for v, _ in MIGRATIONS]
    assert [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")] == versions
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert migrate(conn) == []  # idempotent
    columns = {r[1] for r in conn.execute("PRAGMA table_info(ledger)")}
    design = [
        "request_id",
        "ts",
        "tenant_id",
        "user",
        "feature",
        "route",
        "prompt_version",
        "model",
        "provider",
        "attempts",
        "input_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "output_tokens",
        "reasoning_tokens",
        "usage_estimated",
        "cost_usd",
        "saved_usd",
        "cache",
        "escalated",
        "retries",
        "status",
        "error",
        "latency_ms",
        "ttft_ms",
        "idempotency_key",
        "batch",
    ]
    assert set(design) <= columns


def test_migrating_a_database_stopped_at_version_1(tmp_path: Path):
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, applied_at REAL NOT NULL)")
    for statement in MIGRATIONS[0][1].split(";"):
        if statement.strip():
            conn.execute(statement)
    conn.execute("INSERT INTO schema_migrations VALUES (1, 0)")
    conn.commit()
    conn.close()
    assert migrate(sqlite3.connect(db, isolation_level=None)) == [v for v, _ in MIGRATIONS[1:]]


def test_keys_are_stored_only_hashed(tmp_path: Path):
    conn = open_database(tmp_path / "k.db")
    store = SqliteKeyStore(conn)
    key = store.create("acme", "ci")
    assert key.startswith("thr-") and len(key) > 40
    assert store.tenant_for_hash(hash_key(key)) == "acme"
    dump = "\n".join(conn.iterdump())
    assert key not in dump and hash_key(key) in dump
    assert store.revoke(hash_key(key)[:12]) == 1
    assert store.tenant_for_hash(hash_key(key)) is None

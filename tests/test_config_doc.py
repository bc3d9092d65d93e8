"""README's config reference against dcgan_dist/config.py: every key listed once, none invented, and each
documented default, given back to `load_config` as an override, yields the dataclass default.

A row may list several keys: `a`, `b` with one default for all or one default per key.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest

from dcgan_dist.config import Config, load_config

README = Path(__file__).resolve().parents[1] / "README.md"


def config_defaults(node: Any = None, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> default value, from the dataclasses themselves."""
    node = Config() if node is None else node
    found = {}
    for f in dataclasses.fields(node):
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(value):
            found.update(config_defaults(value, f"{prefix}{f.name}."))
        else:
            found[prefix + f.name] = value
    return found


def documented_defaults() -> list[tuple[str, str]]:
    """(key, default as written) for every key of README's "Config reference" table, in table order."""
    text = README.read_text(encoding="utf-8")
    assert "\n## Config reference\n" in text, "README lost its '## Config reference' section"
    section = text.split("\n## Config reference\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")][2:]  # after header and rule
    assert rows, "README's config table has no rows"
    documented = []
    for row in rows:
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        keys, defaults = re.findall(r"`([^`]+)`", cells[0]), re.findall(r"`([^`]+)`", cells[1])
        assert keys, f"README config row without a key: {row}"
        assert len(defaults) in (1, len(keys)), f"README config row: {len(keys)} keys, {len(defaults)} defaults: {row}"
        documented += zip(keys, defaults * len(keys) if len(defaults) == 1 else defaults)
    return documented


def read_key(cfg: Config, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def test_every_config_key_is_documented_once_and_no_other():
    keys = [key for key, _ in documented_defaults()]
    duplicated = sorted({k for k in keys if keys.count(k) > 1})
    assert not duplicated, f"README lists these config keys twice: {duplicated}"
    expected = set(config_defaults())
    assert not expected - set(keys), f"README's config table lacks {sorted(expected - set(keys))}"
    invented = sorted(set(keys) - expected)
    assert not invented, f"README's config table lists keys config.py does not have: {invented}"


@pytest.mark.parametrize("key, written", documented_defaults(), ids=lambda v: str(v))
def test_documented_default_is_the_dataclass_default(key, written):
    defaults = config_defaults()
    if key not in defaults:
        pytest.skip(f"{key} is not a config key (the test above names it)")
    # the default as a user would type it: read as YAML and validated like any override
    assert read_key(load_config(None, [f"{key}={written}"]), key) == defaults[key], (
        f"README says {key} defaults to {written!r}; config.py says {defaults[key]!r}")

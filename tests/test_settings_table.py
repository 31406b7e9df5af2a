"""docs/configuration.md's settings table is app/settings.py's: same variables, same defaults."""

from __future__ import annotations

import re
from pathlib import Path

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `(BLINK_[A-Z0-9_]+)` \| `([^`]*)` \|", re.MULTILINE)


def documented() -> dict[str, str]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    return dict(ROW.findall(text))


def shown(default: object) -> str:
    """A default as the table writes it: 0.0 as `0`, False as `false`."""
    if isinstance(default, bool):
        return str(default).lower()
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def test_every_setting_is_documented_with_its_default() -> None:
    prefix = Settings.model_config["env_prefix"]
    actual = {f"{prefix}{name}".upper(): f.default for name, f in Settings.model_fields.items()}
    table = documented()
    assert sorted(table) == sorted(actual), "docs/configuration.md's settings table is stale"
    wrong = {n: (table[n], shown(d)) for n, d in actual.items() if table[n] != shown(d)}
    assert not wrong, f"documented default != app/settings.py default: {wrong}"

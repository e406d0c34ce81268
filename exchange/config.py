"""Where carbonx keeps its data and which PostgreSQL it talks to.

Resolution order for the data directory: an explicit `--data-dir`, then `CARBONX_DATA_DIR`, then
the per-user data directory (`~/.local/share/carbonx` on Linux). `DATABASE_URL`, when set, names a
real PostgreSQL server and the embedded one is not started.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import platformdirs


def default_data_dir() -> Path:
    """The per-user data directory used when nothing else is said."""
    return Path(platformdirs.user_data_dir("carbonx", appauthor=False))


def resolve_data_dir(explicit: Path | str | None = None) -> Path:
    """The data directory to use: `explicit`, else CARBONX_DATA_DIR, else the per-user default."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get("CARBONX_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return default_data_dir()


@dataclass(frozen=True)
class Settings:
    """What a process needs to find its database."""

    data_dir: Path
    database_url: str | None

    @property
    def pgdata(self) -> Path:
        """The embedded server's cluster directory (unused with DATABASE_URL)."""
        return self.data_dir / "pg"


def load_settings(data_dir: Path | str | None = None) -> Settings:
    """Settings from the command line value and the environment."""
    return Settings(data_dir=resolve_data_dir(data_dir), database_url=os.environ.get("DATABASE_URL") or None)

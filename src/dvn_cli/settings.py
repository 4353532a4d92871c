"""Settings that come from the environment, torch-free so that any layer (and a torch-free runtime) can read them."""

from __future__ import annotations

import os

__all__ = ["DATA_ROOT_ENV", "data_root"]

DATA_ROOT_ENV = "DVN_DATA_ROOT"
"""Environment variable that moves the data folder (``make data`` and ``dvn`` read it)."""


def data_root(flag: str | None = None, fallback: str | None = None) -> str:
    """The data root: ``--data-root``, else ``$DVN_DATA_ROOT``, else ``fallback`` (a config file's or a stored run's),
    else ``data``."""
    return flag or os.environ.get(DATA_ROOT_ENV) or fallback or "data"

"""Where circuit backends keep caches and find IBM credentials.

`circuits` does not import the service's settings (it sits below them); the worker hands the values over once
with `configure(cache_dir=settings.cache_dir, ibm_token=..., ibm_instance=...)`. Without that call the same
`QAA_*` environment variables the settings read are used, so scripts and tests need no set-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path


@dataclass(frozen=True)
class BackendEnvironment:
    cache_dir: Path
    ibm_token: str | None = field(default=None, repr=False)  # a logged environment must not show it
    ibm_instance: str | None = None
    connect_timeout_s: float = 20.0  # IBM sign-in and backend lookup; past it, a readable error


_current: BackendEnvironment | None = None


def environment() -> BackendEnvironment:
    global _current
    if _current is None:
        home = Path(os.environ.get("QAA_HOME", "~/.qaa")).expanduser()
        _current = BackendEnvironment(
            cache_dir=home / "cache",
            ibm_token=os.environ.get("QAA_IBM_TOKEN") or None,
            ibm_instance=os.environ.get("QAA_IBM_INSTANCE") or None,
        )
    return _current


def configure(**changes) -> BackendEnvironment:
    """Override fields of the environment (e.g. from the worker's settings); returns the new one."""
    global _current
    _current = replace(environment(), **{k: (Path(v) if k == "cache_dir" else v) for k, v in changes.items()})
    return _current

"""Where the server is and which key to present: flags, then `QAA_URL`/`QAA_API_KEY`, then the credentials file.

The embedded server (`qaa up`) writes `$QAA_HOME/credentials` (default `~/.qaa/credentials`) as
`{"url": ..., "api_key": ...}` on its first start, so on one machine the client works with no setup at all.
Each value is resolved on its own: `--url` with the key from the file is a valid combination.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"


class ConfigError(Exception):
    """The configuration cannot be used as given (an unreadable or malformed credentials file)."""


@dataclass(frozen=True)
class Connection:
    url: str
    api_key: str | None
    key_source: str  # where the key came from, for messages about a refused key


def credentials_path() -> Path:
    return Path(os.environ.get("QAA_HOME") or "~/.qaa").expanduser() / "credentials"


def read_credentials(path: Path) -> dict[str, str]:
    """The credentials file's `url` and `api_key` (either may be absent); {} when there is no file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read the credentials file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"the credentials file {path} is not JSON ({exc.msg} at line {exc.lineno})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f'the credentials file {path} must hold a JSON object {{"url": ..., "api_key": ...}}')
    return {k: v for k, v in data.items() if k in ("url", "api_key") and isinstance(v, str) and v}


def resolve(url: str | None = None, api_key: str | None = None) -> Connection:
    """The connection to use: explicit arguments win, then the environment, then the credentials file."""
    url = url or os.environ.get("QAA_URL") or None
    key_source = "--api-key"
    if not api_key:
        api_key, key_source = os.environ.get("QAA_API_KEY") or None, "QAA_API_KEY"
    if url is None or api_key is None:
        path = credentials_path()
        saved = read_credentials(path)
        url = url or saved.get("url")
        if api_key is None and "api_key" in saved:
            api_key, key_source = saved["api_key"], str(path)
    if api_key is None:
        key_source = f"none found (--api-key, QAA_API_KEY, {credentials_path()})"
    return Connection((url or DEFAULT_URL).rstrip("/"), api_key, key_source)

"""Bearer API keys, and the key the embedded server makes for itself on first start.

Keys are checked against their SHA-256 in the store (`Store.verify_api_key`); the plaintext is never logged,
stored or returned. Missing, unknown, revoked and expired keys all answer the same 401, so a caller learns nothing
about which keys exist.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from service.problems import Problem
from service.settings import Settings
from service.store import Store

LOCAL_OWNER = "local"
CREDENTIALS_FILE = "credentials"

log = logging.getLogger("qaa.api")


def owner_for_authorization(store: Store, authorization: str | None) -> str:
    """The owner behind an `Authorization: Bearer <key>` header, or a 401 `Problem`."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise _unauthorized("an API key is required: send 'Authorization: Bearer <key>'")
    owner = store.verify_api_key(key.strip())
    if owner is None:
        raise _unauthorized("the API key is not valid (unknown, revoked or expired)")
    return owner


def _unauthorized(detail: str) -> Problem:
    return Problem(401, detail, headers={"WWW-Authenticate": "Bearer"})


def credentials_path(settings: Settings) -> Path:
    return settings.home_dir / CREDENTIALS_FILE


def ensure_local_key(store: Store, settings: Settings) -> Path | None:
    """Embedded default only (no `QAA_DATABASE_URL`): when the store holds no key at all, make one for
    owner `local` and write it with the server's URL to `QAA_HOME/credentials` (mode 0600), where
    `qaa-client` looks; on later starts, keep the file's URL current (a restart on another port).
    Returns the file written, or None when nothing was needed. Production deployments make keys with
    `qaa keys create OWNER`.
    """
    if settings.database_url is not None:
        return None
    url = settings.url
    path = credentials_path(settings)
    if store.list_api_keys():
        return _update_url(path, url)
    _, plaintext = store.create_api_key(LOCAL_OWNER, label="embedded default")
    write_credentials(path, url, plaintext)
    log.info("created an API key for owner %r; it is in %s", LOCAL_OWNER, path)
    return path


def _update_url(path: Path, url: str) -> Path | None:
    """Point an existing credentials file at `url`, keeping its key; a missing or foreign file is left alone."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or not isinstance(saved.get("api_key"), str) or saved.get("url") == url:
        return None
    write_credentials(path, url, saved["api_key"])
    return path


def write_credentials(path: Path, url: str, api_key: str) -> None:
    """Write `{"url", "api_key"}` readable by the owner only; the mode is set before any byte is written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its old mode through O_CREAT
    with os.fdopen(fd, "w") as f:
        json.dump({"url": url, "api_key": api_key}, f)
        f.write("\n")

"""The key that encrypts the secrets users store (IBM Quantum tokens), and the encryption itself.

Fernet (AES-128-CBC with an HMAC-SHA256 tag) under a key derived by HKDF-SHA256 from `QAA_SECRET_KEY`. In the
embedded default (no `QAA_DATABASE_URL`) an unset key is made once and kept in `QAA_HOME/secret_key` (mode
0600), which the API and the local workers share. A production deployment without `QAA_SECRET_KEY` stores no
secret at all, never plaintext: `secret_box` raises `SecretKeyMissing`, which the API answers with a 503 saying
what to set. The API and every worker need the same key; a worker with another one cannot decrypt
(`SecretUnreadable`) and fails the job saying so.

`cryptography` is imported on first use, so the API's start-up does not pay for it.
"""

from __future__ import annotations

import base64
import os
import secrets
import tempfile
from pathlib import Path

from service.settings import Settings

SECRET_KEY_FILE = "secret_key"
MIN_KEY_CHARS = 32
_HKDF_INFO = b"qaa stored credentials v1"


class SecretKeyMissing(RuntimeError):
    """No usable key: nothing can be encrypted or decrypted until one is configured."""


class SecretUnreadable(RuntimeError):
    """A stored secret does not decrypt under this process's key (another key, or a damaged value)."""


class SecretBox:
    """Encrypts and decrypts short strings. Holds only the derived Fernet key, which is never shown."""

    def __init__(self, secret: str, source: str):
        if len(secret) < MIN_KEY_CHARS:
            raise SecretKeyMissing(f"{source} must be at least {MIN_KEY_CHARS} characters (`openssl rand -hex 32`)")
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret.encode())
        self._fernet = Fernet(base64.urlsafe_b64encode(key))
        self.source = source

    def __repr__(self) -> str:
        return f"SecretBox(source={self.source!r})"

    def encrypt(self, plaintext: str) -> str:
        return self._fernet.encrypt(plaintext.encode()).decode("ascii")

    def decrypt(self, sealed: str) -> str:
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(sealed.encode("ascii")).decode()
        except (InvalidToken, UnicodeError):
            raise SecretUnreadable(
                f"the stored secret does not decrypt with the key in {self.source}: it was stored under another "
                "key (the API and every worker need the same QAA_SECRET_KEY); store it again"
            ) from None


def key_path(settings: Settings) -> Path:
    return settings.home_dir / SECRET_KEY_FILE


def secret_box(settings: Settings, *, create: bool) -> SecretBox:
    """The box for `settings`' key: `QAA_SECRET_KEY`, else (embedded default only) `QAA_HOME/secret_key`, made
    first if `create`. Raises `SecretKeyMissing` when there is none."""
    if settings.secret_key is not None:
        return SecretBox(settings.secret_key.get_secret_value(), "QAA_SECRET_KEY")
    if settings.database_url is not None:
        raise SecretKeyMissing(
            "no key encrypts stored secrets: set QAA_SECRET_KEY (32+ characters, the same for the API and every worker)"
        )
    path = key_path(settings)
    try:
        secret = path.read_text().strip()
    except FileNotFoundError:
        if not create:
            raise SecretKeyMissing(
                f"QAA_SECRET_KEY is unset and {path} does not exist: secrets stored under a deleted key file are "
                "lost; store them again"
            ) from None
        secret = _create_key_file(path)
    return SecretBox(secret, str(path))


def _create_key_file(path: Path) -> str:
    """Write a new random key readable by the owner only, unless another process got there first; the key
    in the file either way. The file appears whole (hard link of a finished temporary file) or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{SECRET_KEY_FILE}-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:  # a concurrent first start made it: use theirs, so every process shares one key
            pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()

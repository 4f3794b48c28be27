"""Per-owner secrets for outside services (today `ibm`: an IBM Quantum API token and instance), encrypted at rest.

The store never holds plaintext: `set_credential` encrypts with the caller's `SecretBox` before any SQL runs (so
not even a failed statement's logged parameters carry the token), and only `get_credential` decrypts, for the
worker that signs in. Everything else sees `CredentialInfo`, which has no secret in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, select

from service.store.base import StoreBase, check_owner
from service.store.models import Credential
from service.store.records import _insert

if TYPE_CHECKING:
    from service.vault import SecretBox

CREDENTIAL_KINDS = ("ibm",)


@dataclass(frozen=True)
class CredentialInfo:
    """What may be shown about a stored credential: that it is set, for which instance, since when."""

    kind: str
    instance: str | None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Credential) -> CredentialInfo:
        return cls(kind=row.kind, instance=row.instance, created_at=row.created_at, updated_at=row.updated_at)


@dataclass(frozen=True)
class OwnerCredential:
    """A decrypted credential; `repr` leaves the token out, so logging the object leaks nothing."""

    token: str = field(repr=False)
    instance: str | None


def _check_kind(kind: str) -> str:
    if kind not in CREDENTIAL_KINDS:
        raise ValueError(f"unknown credential kind {kind!r}; known: {', '.join(CREDENTIAL_KINDS)}")
    return kind


class CredentialRepo(StoreBase):
    """The credential methods of `Store`."""

    def set_credential(
        self, owner: str, kind: str, token: str, box: SecretBox, *, instance: str | None = None
    ) -> CredentialInfo:
        """Store (or replace) `owner`'s `kind` credential; `created_at` stays that of the first one."""
        values = {"encrypted_token": box.encrypt(token), "instance": instance, "updated_at": self._now()}
        with self._write() as s:
            stmt = _insert(s, Credential).values(
                owner=check_owner(owner), kind=_check_kind(kind), created_at=values["updated_at"], **values
            )
            s.execute(stmt.on_conflict_do_update(index_elements=[Credential.owner, Credential.kind], set_=values))
            row = s.scalars(select(Credential).where(Credential.owner == owner, Credential.kind == kind)).one()
            return CredentialInfo.of(row)

    def get_credential(self, owner: str, kind: str, box: SecretBox) -> OwnerCredential | None:
        """The decrypted credential, for the worker signing in on the owner's behalf (never behind an API
        route). None if none is stored; `SecretUnreadable` if `box` holds another key than it was stored with."""
        with self._read() as s:
            row = s.get(Credential, (owner, kind))
        if row is None:
            return None
        return OwnerCredential(token=box.decrypt(row.encrypted_token), instance=row.instance)

    def delete_credential(self, owner: str, kind: str) -> bool:
        """Forget `owner`'s `kind` credential; False if there was none."""
        with self._write() as s:
            result = s.execute(
                delete(Credential)
                .where(Credential.owner == owner, Credential.kind == kind)
                .execution_options(synchronize_session=False)
            )
            return result.rowcount == 1

    def describe_credentials(self, owner: str) -> list[CredentialInfo]:
        """`owner`'s stored credentials without their secrets, by kind."""
        with self._read() as s:
            rows = s.scalars(select(Credential).where(Credential.owner == owner).order_by(Credential.kind))
            return [CredentialInfo.of(row) for row in rows]

"""Request dependencies: the settings, the store and the caller's identity.

Routes ask for `SettingsDep`, `StoreDep` and `CurrentOwner`; tests replace them through
`app.dependency_overrides[get_store]` (and friends) instead of monkeypatching. The store owns its sessions
(one short transaction per method), so routes need no session of their own.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from service.auth import owner_for_authorization
from service.settings import Settings
from service.store import Store

# auto_error=False: a missing header reaches `current_owner`, which answers with our problem+json 401.
bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer qaa_...`")


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_store(request: Request) -> Store:
    return request.app.state.store


SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[Store, Depends(get_store)]


def current_owner(store: StoreDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> str:
    header = f"{credentials.scheme} {credentials.credentials}" if credentials else None
    return owner_for_authorization(store, header)


CurrentOwner = Annotated[str, Depends(current_owner)]

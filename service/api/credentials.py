"""`/v1/credentials`: secrets a user stores for outside services; today the IBM Quantum token for `ibm:` backends.

Write-only: the token goes in with `PUT`, is encrypted before it reaches the store (`service.vault`), and no
answer or log line ever holds it; `GET` says only that it is set. The caller's `ibm:` jobs sign in with it
(`workers.tasks.ibm_credentials`). Another owner's credential is out of reach: every route acts on the
caller's own.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response

from service.deps import CurrentOwner, SettingsDep, StoreDep
from service.problems import Problem, problem_responses
from service.schemas import CredentialOut, IbmCredentialIn
from service.vault import SecretKeyMissing, secret_box

router = APIRouter(prefix="/v1/credentials", tags=["credentials"], responses=problem_responses(401))

log = logging.getLogger("qaa.api")


@router.put(
    "/ibm",
    responses=problem_responses(422, 503),
    summary="Store or replace your IBM Quantum token for `ibm:` backends (write-only: never shown again)",
)
def put_ibm(body: IbmCredentialIn, store: StoreDep, settings: SettingsDep, owner: CurrentOwner) -> CredentialOut:
    try:
        box = secret_box(settings, create=True)
    except SecretKeyMissing as exc:  # a server without a key stores nothing, rather than plaintext
        raise Problem(503, f"IBM tokens cannot be stored on this server, so nothing was stored: {exc}") from None
    info = store.set_credential(owner, "ibm", body.token.get_secret_value(), box, instance=body.instance)
    log.info("owner %r stored an IBM Quantum token", owner)
    return CredentialOut.from_info(info)


@router.get("", summary="Your stored credentials: which are set, never their secrets")
def list_credentials(store: StoreDep, owner: CurrentOwner) -> list[CredentialOut]:
    return [CredentialOut.from_info(info) for info in store.describe_credentials(owner)]


@router.delete(
    "/ibm",
    status_code=204,
    response_class=Response,
    responses=problem_responses(404),
    summary="Forget your IBM Quantum token",
)
def delete_ibm(store: StoreDep, owner: CurrentOwner) -> Response:
    if not store.delete_credential(owner, "ibm"):
        raise Problem(404, "no IBM Quantum token is stored; PUT /v1/credentials/ibm stores one")
    log.info("owner %r deleted their IBM Quantum token", owner)
    return Response(status_code=204)

"""`python -m circuits.backends`: the backend list as JSON on stdout, for the API's child process.

stdin (optional JSON): {"ibm_token": ..., "ibm_instance": ...} adds the IBM devices that token can use; a
listing that fails answers {"error": ..., "unreachable": bool} instead (the token is never echoed).
"""

import json
import sys

from . import list_backends
from .environment import configure
from .ibm import BackendUnavailable

request = json.loads(sys.stdin.read() or "{}")
if request.get("ibm_token"):
    configure(ibm_token=request["ibm_token"], ibm_instance=request.get("ibm_instance"))
try:
    print(json.dumps(list_backends(hardware=bool(request.get("ibm_token")))))
except BackendUnavailable as exc:
    print(json.dumps({"error": str(exc), "unreachable": "cannot reach" in str(exc) or "did not answer" in str(exc)}))

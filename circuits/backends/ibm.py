"""`ibm:<backend>`: signing in to IBM Quantum and finding its devices.

Sign-in and backend lookup run under a deadline in a daemon thread: with no token, a rejected token or no
network the run fails at its start with a readable error, instead of retrying for minutes inside the client.
The device then runs through the same runner as the fake backends (`runtime.RuntimeRunner`).
"""

from __future__ import annotations

import threading

from .environment import BackendEnvironment


class BackendUnavailable(RuntimeError):
    """A backend cannot be used: missing or rejected credentials, unreachable service, unknown name."""


def _with_deadline(fn, seconds: float, what: str):
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except Exception as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True, name=f"qaa-{what}")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise BackendUnavailable(f"IBM Quantum did not answer within {seconds:.0f} s ({what}); check the network")
    if "error" in box:
        raise box["error"]
    return box["value"]


def _guarded(fn, env: BackendEnvironment, label: str):
    """Run `fn(service)` under the deadline, turning every failure into a BackendUnavailable about `label`."""
    if not env.ibm_token:
        raise BackendUnavailable(
            f"{label} needs an IBM Quantum API token: set QAA_IBM_TOKEN (and QAA_IBM_INSTANCE) for the worker"
        )

    def call():
        from qiskit_ibm_runtime import QiskitRuntimeService

        service = QiskitRuntimeService(channel="ibm_quantum_platform", token=env.ibm_token, instance=env.ibm_instance)
        return fn(service)

    try:
        return _with_deadline(call, env.connect_timeout_s, label)
    except BackendUnavailable:
        raise
    except Exception as exc:
        text = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
        if any(word in text.lower() for word in ("unauthorized", "401", "403", "invalid", "api key", "token")):
            raise BackendUnavailable(f"IBM Quantum rejected the API token ({label}): {text}") from None
        raise BackendUnavailable(f"cannot reach IBM Quantum ({label}): {text}") from None


def connect(name: str, env: BackendEnvironment):
    """The IBMBackend `name`, or BackendUnavailable saying what to fix."""
    return _guarded(lambda service: service.backend(name), env, f"backend 'ibm:{name}'")


def list_devices(env: BackendEnvironment) -> list[dict]:
    """The hardware backends the configured account can use, as `list_backends` rows."""

    from . import device_row

    def rows(service):
        return [device_row(f"ibm:{b.name}", "hardware", b, b.status().pending_jobs) for b in service.backends()]

    return _guarded(rows, env, "listing IBM backends")

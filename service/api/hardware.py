"""Hardware figures for `POST /v1/estimate`: each distinct adapter circuit as it will run on a `fake:` or `ibm:`
device (2-qubit gates, depth, duration, physical qubits, ESP), and the QPU-seconds range they imply.

They come from `python -m circuits.hardware` in a child process, so the API process never imports qiskit; the
child transpiles through the shared per-backend cache under the run's own key (the job then transpiles
nothing), and the answer is kept in this process per circuit key, so a second estimate answers at once. An
`ibm:` device is looked up with the caller's stored token (or the workers' token, for owners the operator
allows), handed to the child on stdin, never in its arguments or environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping

from circuits import QAAConfig
from circuits.cost_estimate import JOB_OVERHEAD_S, Widths
from circuits.hardware import LOW_ESP
from service.settings import Settings

#: A cold fake backend transpiles in seconds; an IBM device lookup may take longer.
HARDWARE_TIMEOUT_S = 120
#: One child at a time per API process (each takes a core for seconds); a request waits this long for its turn.
WAIT_FOR_TURN_S = 30
CACHE_SIZE = 256
_CACHE: dict[tuple, list[dict]] = {}
_LOCK = threading.Lock()
_TURN = threading.Semaphore(1)


class HardwareUnavailable(RuntimeError):
    """The figures could not be computed (no token, unreachable service, unknown device); the message says why."""


def _key(config: QAAConfig, sizes: tuple[int, ...], token: str | None) -> tuple:
    account = hashlib.sha256((token or "").encode()).hexdigest()[:16]
    return (config.backend, sizes, config.layers, config.entangler, config.embedding, config.optimization_level,
            config.seed, account)  # fmt: skip


def circuits_on_backend(
    config: QAAConfig, sizes: list[int], settings: Settings, token: str | None = None, instance: str | None = None
) -> list[dict]:
    """One row per distinct register size (see `circuits.hardware.CircuitFigures`), cached."""
    distinct = tuple(sorted(set(sizes)))
    key = _key(config, distinct, token)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    request = {
        "config": config.model_dump(mode="json"),
        "qubits": list(distinct),
        "cache_dir": str(settings.cache_dir),
        "ibm_token": token,
        "ibm_instance": instance,
    }
    env = {k: v for k, v in os.environ.items() if k not in ("QAA_IBM_TOKEN", "QAA_SECRET_KEY")}
    if not _TURN.acquire(timeout=WAIT_FOR_TURN_S):
        raise HardwareUnavailable("the server is busy computing other device figures; ask again shortly")
    try:
        done = subprocess.run([sys.executable, "-m", "circuits.hardware"], input=json.dumps(request),
                              capture_output=True, text=True, timeout=HARDWARE_TIMEOUT_S, env=env)  # fmt: skip
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        raise HardwareUnavailable(f"the device figures took longer than {HARDWARE_TIMEOUT_S} s") from None
    except (IndexError, json.JSONDecodeError):
        raise HardwareUnavailable("the device figures could not be computed (see the server log)") from None
    finally:
        _TURN.release()
    if "error" in answer:
        raise HardwareUnavailable(answer["error"])
    with _LOCK:
        if len(_CACHE) >= CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))  # the oldest entry
        _CACHE[key] = answer["circuits"]
    return answer["circuits"]


def qpu_range(config: QAAConfig, by_width: Mapping[tuple[int, int], tuple[int, int]], figures: list[dict]) -> tuple:
    """(low, high) QPU seconds from executions and runtime jobs per adapter shape and each circuit's figures:
    executions x (repetition delay [+ duration]) + runtime jobs x overhead (`circuits.hardware`)."""
    by_size = {row["qubits"]: row for row in figures}
    low = high = 0.0
    for (d_in, _), (executions, jobs) in by_width.items():
        row = by_size[config.num_qubits(d_in)]
        low += executions * row["rep_delay_s"] + jobs * JOB_OVERHEAD_S[0]
        high += executions * (row["rep_delay_s"] + row["duration_s"]) + jobs * JOB_OVERHEAD_S[1]
    return low, high


def warnings_for(figures: list[dict]) -> list[str]:
    return [
        f"the {row['qubits']}-qubit circuit has an estimated success probability of {row['esp']:.3f} on "
        f"{row['backend']} ({row['two_qubit_gates']} two-qubit gates): the readout will be mostly noise on this device"
        for row in figures
        if row["esp"] < LOW_ESP
    ]


def register_sizes(config: QAAConfig, widths: Widths) -> list[int]:
    return sorted({config.num_qubits(d_in) for d_in, _ in widths})

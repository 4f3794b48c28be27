"""API under load: 50 concurrent clients submit jobs and poll them for 30 s against a live `qaa api` on PostgreSQL
and Redis (no worker: this measures the API, the store and the broker, not training).

    python benchmarks/api_load.py [--clients 50] [--seconds 30]   # writes benchmarks/results/api_load.json

Needs PostgreSQL (QAA_TEST_DATABASE_URL, default postgres@127.0.0.1/test: a scratch database is created next to it
and dropped) and Redis (QAA_TEST_REDIS_URL, default 127.0.0.1:6379; db 7 is flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

RESULTS = Path(__file__).parent / "results" / "api_load.json"
SPEC = {
    "model": "builtin:tiny-llama",
    "dataset": "builtin:restaurants",
    "method": {"kind": "qaa", "target_modules": ["q_proj", "v_proj"], "layers": 1},
    "training": {"steps": 5, "batch_size": 2, "max_length": 32},
    "evaluation": {"metrics": ["bleu"], "samples": 4, "max_new_tokens": 8},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _client(http: httpx.AsyncClient, deadline: float, lat: dict[str, list[float]], errors: list[str]) -> None:
    job_ids: list[str] = []
    while time.monotonic() < deadline:
        route, call = (
            ("POST /v1/jobs", http.post("/v1/jobs", json=SPEC))
            if len(job_ids) < 3
            else ("GET /v1/jobs/{id}", http.get(f"/v1/jobs/{job_ids[len(lat['GET /v1/jobs/{id}']) % len(job_ids)]}"))
        )
        start = time.perf_counter()
        try:
            response = await call
        except httpx.HTTPError as exc:
            errors.append(f"{route}: {type(exc).__name__}")
            continue
        lat[route].append((time.perf_counter() - start) * 1000)
        if response.status_code >= 400:
            errors.append(f"{route}: {response.status_code}")
        elif route.startswith("POST"):
            job_ids.append(response.json()["id"])


async def _load(url: str, key: str, clients: int, seconds: float) -> tuple[dict[str, list[float]], list[str]]:
    lat: dict[str, list[float]] = {"POST /v1/jobs": [], "GET /v1/jobs/{id}": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=30) as http:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(_client(http, deadline, lat, errors) for _ in range(clients)))
    return lat, errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()

    base = make_url(os.environ.get("QAA_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"))
    redis = os.environ.get("QAA_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
    head, _, last = redis.rpartition("/")
    redis = head if last.isdigit() else redis  # the benchmark uses its own db number
    name = f"qaa_load_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    home = Path(tempfile.mkdtemp(prefix="qaa-load-"))
    port = _free_port()
    env = {
        **os.environ,
        "QAA_HOME": str(home),
        "QAA_DATABASE_URL": base.set(database=name).render_as_string(hide_password=False),
        "QAA_BROKER_URL": f"{redis}/7",
        "QAA_PORT": str(port),
    }
    import redis as redis_lib

    redis_lib.Redis.from_url(f"{redis}/7").flushdb()
    api = None
    try:
        subprocess.run([sys.executable, "-m", "workers.cli", "migrate"], env=env, check=True, capture_output=True)
        made = subprocess.run(
            [sys.executable, "-m", "workers.cli", "keys", "create", "load"],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        key = made.stdout.strip()  # `qaa keys create` prints the key alone on stdout
        api = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "api", f"--port={port}"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lat, errors = asyncio.run(_load(url, key, args.clients, args.seconds))
        rss = psutil.Process(api.pid).memory_info().rss / 2**20
    finally:
        if api:
            api.terminate()
            api.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    everything = [v for values in lat.values() for v in values]
    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "requests": len(everything),
        "errors": len(errors),
        "error_kinds": sorted(set(errors))[:10],
        "p50_ms": round(statistics.median(everything), 1),
        "p99_ms": round(_percentile(everything, 0.99), 1),
        "routes": {
            route: {
                "requests": len(v),
                "p50_ms": round(statistics.median(v), 1),
                "p99_ms": round(_percentile(v, 0.99), 1),
            }
            for route, v in lat.items()
            if v
        },
        "api_rss_mb": round(rss, 1),
        "setup": "qaa api (uvicorn, 1 process) on PostgreSQL + Redis, no worker, clients in one asyncio process",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

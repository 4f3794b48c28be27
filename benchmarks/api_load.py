"""API under load: 50 concurrent clients submit jobs and poll them against a live `qaa api` on PostgreSQL and
Redis (no worker: this measures the API, the store and the broker, not training).

Two phases, one API process:
- `load` (the target): each client is a user with its own key, polling its jobs every `--interval` seconds
  (1 s: what `qaa-client watch` does; the dashboard polls every 2 s) and submitting a new job every
  `--submit-every` polls, for `--seconds`. Keys `requests`, `errors`, `p50_ms`, `p99_ms`, `api_rss_mb`.
- `saturation`: the same clients with no pause at all, for `--saturate-seconds`: the most requests per second
  one API process serves here (`saturation.rps`), and the latency once requests queue behind each other.

    python benchmarks/api_load.py [--clients 50] [--seconds 30]   # writes benchmarks/results/api_load.json

Needs PostgreSQL (QAA_TEST_DATABASE_URL, default postgres@127.0.0.1/test: a scratch database is created next to it
and dropped) and Redis (QAA_TEST_REDIS_URL, default 127.0.0.1:6379; db 7 is flushed).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
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


async def _client(
    http: httpx.AsyncClient,
    key: str,
    deadline: float,
    pause: float,
    submit_every: int,
    lat: dict[str, list[float]],
    errors: list[str],
) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    job_ids: list[str] = []
    polls = 0
    await asyncio.sleep(random.uniform(0, pause))  # users arrive spread over one interval, not in one instant
    while time.monotonic() < deadline:
        if not job_ids or polls % submit_every == submit_every - 1:
            route, call = "POST /v1/jobs", http.post("/v1/jobs", json=SPEC, headers=headers)
        else:
            route, call = "GET /v1/jobs/{id}", http.get(f"/v1/jobs/{job_ids[polls % len(job_ids)]}", headers=headers)
        polls += 1
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
        if pause:
            await asyncio.sleep(pause)


async def _load(
    url: str, keys: list[str], seconds: float, pause: float, submit_every: int
) -> tuple[dict[str, list[float]], list[str]]:
    lat: dict[str, list[float]] = {"POST /v1/jobs": [], "GET /v1/jobs/{id}": []}
    errors: list[str] = []
    limits = httpx.Limits(max_connections=len(keys))
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as http:
        deadline = time.monotonic() + seconds
        clients = (_client(http, key, deadline, pause, submit_every, lat, errors) for key in keys)
        await asyncio.gather(*clients)
    return lat, errors


def _summary(lat: dict[str, list[float]], errors: list[str], seconds: float) -> dict:
    everything = [v for values in lat.values() for v in values]
    return {
        "requests": len(everything),
        "rps": round(len(everything) / seconds, 1),
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--interval", type=float, default=1.0, help="Seconds between one client's requests.")
    parser.add_argument("--submit-every", type=int, default=10, help="One submission per this many requests.")
    parser.add_argument("--saturate-seconds", type=float, default=10)
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
        from service.store import Store, make_engine  # one key per client, as each client is a user

        store = Store(make_engine(env["QAA_DATABASE_URL"]))
        keys = [store.create_api_key(f"load-{i}")[1] for i in range(args.clients)]
        store.close()
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
        load = _summary(*asyncio.run(_load(url, keys, args.seconds, args.interval, args.submit_every)), args.seconds)
        rss = psutil.Process(api.pid).memory_info().rss / 2**20
        saturation = _summary(*asyncio.run(_load(url, keys, args.saturate_seconds, 0, 30)), args.saturate_seconds)
    finally:
        if api:
            api.terminate()
            api.wait(timeout=10)
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    result = {
        "clients": args.clients,
        "seconds": args.seconds,
        "interval_s": args.interval,
        "submit_every": args.submit_every,
        **load,
        "api_rss_mb": round(rss, 1),
        "saturation": {"seconds": args.saturate_seconds, **saturation},
        "setup": "qaa api (uvicorn, 1 process) on PostgreSQL + Redis, no worker, clients in one asyncio process "
        "on the same 2 cores, one API key per client",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""Soak: tiny jobs submitted by concurrent clients to two workers while one worker is SIGKILLed and restarted
every K seconds, on PostgreSQL and Redis. Nothing may be lost and no step may be recorded twice.

    python benchmarks/soak.py                                   # 200 jobs, 20 clients, a kill every 60 s
    python benchmarks/soak.py --jobs 40 --clients 8 --kill-every 15

Writes `benchmarks/results/soak.json`: `jobs` (accepted with 201), `succeeded`, `failed`, `lost` (accepted but
not finished when the run ends, or missing from the store), `duplicated_steps` (metric points beyond one per
(job, step), or past the job's last step), `missing_steps` (steps absent from a succeeded job),
`p50_submit_ms` / `p99_submit_ms` (201 answers), `kills`, `resumed_jobs` (jobs claimed more than once: the
ones a kill hit), `dropped_messages` (duplicate messages the lease turned away) and the parameters used.

Each client has its own API key and honours 429 `Retry-After` (counted in `rate_limited`). Leases are short so a
killed worker's job is resumed within seconds (see `--lease`); production defaults are 60 s / 15 s / 300 s.
Needs PostgreSQL (`QAA_TEST_DATABASE_URL`; a scratch database next to it, dropped after) and Redis
(`QAA_TEST_REDIS_URL`, db 9, flushed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stack import Services, postgres_database, redis_url, start_api, start_worker  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "soak.json"
REDIS_DB = 9


def broker_url() -> str:
    """The test Redis, on a db of its own (the tests flush theirs), emptied."""
    import redis

    url = redis_url().rsplit("/", 1)[0] + f"/{REDIS_DB}"
    redis.Redis.from_url(url).flushdb()
    return url


def tiny_spec(steps: int, seed: int) -> dict:
    return {
        "model": "builtin:tiny-llama",
        "dataset": "builtin:restaurants",
        "method": {"kind": "qaa", "target_modules": ["q_proj", "v_proj"], "layers": 1},
        "training": {"steps": steps, "batch_size": 2, "max_length": 32, "seed": seed, "checkpoint_every": 1},
        "evaluation": {"metrics": ["bleu"], "samples": 0},
    }


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Clients:
    """`clients` threads, each with its own key, submitting its share of `jobs` back to back."""

    def __init__(self, url: str, keys: list[str], jobs: int, steps: int):
        self.url, self.keys, self.jobs, self.steps = url, keys, jobs, steps
        self.accepted: list[str] = []
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.rate_limited = 0
        self._lock = threading.Lock()

    def run(self) -> None:
        threads = [threading.Thread(target=self._client, args=(i,)) for i in range(len(self.keys))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _client(self, index: int) -> None:
        share = range(index, self.jobs, len(self.keys))
        headers = {"Authorization": f"Bearer {self.keys[index]}"}
        with httpx.Client(base_url=self.url, headers=headers, timeout=60) as http:
            for n in share:
                while True:
                    start = time.perf_counter()
                    try:
                        answer = http.post("/v1/jobs", json=tiny_spec(self.steps, seed=n))
                    except httpx.HTTPError as exc:
                        with self._lock:
                            self.errors.append(type(exc).__name__)
                        break
                    took = (time.perf_counter() - start) * 1000
                    if answer.status_code == 429:
                        with self._lock:
                            self.rate_limited += 1
                        time.sleep(float(answer.headers.get("retry-after", "1")))
                        continue
                    with self._lock:
                        if answer.status_code == 201:
                            self.accepted.append(answer.json()["id"])
                            self.latencies_ms.append(took)
                        else:
                            self.errors.append(str(answer.status_code))
                    break


class Killer(threading.Thread):
    """Every `every` seconds: SIGKILL one worker (alternating) and start a new one in its place."""

    def __init__(self, services: Services, workers: list, every: float):
        super().__init__(daemon=True)
        self.services, self.workers, self.every = services, workers, every
        self.kills = 0
        self.stop = threading.Event()

    def run(self) -> None:
        slot = 0
        while not self.stop.wait(self.every):
            self.workers[slot].kill()
            self.workers[slot].stop()  # closes its log; nothing is left to stop
            self.kills += 1
            self.workers[slot] = start_worker(self.services, name=f"worker{slot}-{self.kills}")
            slot = (slot + 1) % len(self.workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills")
    parser.add_argument("--steps", type=int, default=2, help="training steps per job")
    parser.add_argument("--lease", type=int, default=6, help="QAA_LEASE_SECONDS (heartbeat: a third of it)")
    parser.add_argument("--deadline", type=float, default=1800, help="seconds to wait for all jobs to end")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    leases = {
        "QAA_LEASE_SECONDS": str(args.lease),
        "QAA_HEARTBEAT_SECONDS": str(max(1, args.lease // 3)),
        "QAA_RESEND_AFTER_SECONDS": str(max(1, args.lease // 2)),
    }
    root = Path(tempfile.mkdtemp(prefix="qaa-soak-"))
    started = time.monotonic()
    with postgres_database() as database:
        services = Services.production(root, database, broker_url(), **leases)
        store = services.store()
        keys = [store.create_api_key(f"client{i}")[1] for i in range(args.clients)]
        api, url = start_api(services)
        workers = [start_worker(services, name=f"worker{i}") for i in range(args.workers)]
        killer = Killer(services, workers, args.kill_every)
        try:
            killer.start()
            clients = Clients(url, keys, args.jobs, args.steps)
            clients.run()
            submitted_s = time.monotonic() - started
            deadline = time.monotonic() + args.deadline
            while time.monotonic() < deadline:
                counts = store.count_jobs_by_status()
                if counts["queued"] + counts["running"] + counts["cancelling"] == 0:
                    break
                time.sleep(1)
            killer.stop.set()
            killer.join()
        finally:
            killer.stop.set()
            for proc in [api, *workers]:
                proc.stop(timeout=10)
        result = summarize(store, clients, killer, args, leases, submitted_s, time.monotonic() - started)
        logs = "".join(p.read_text(errors="replace") for p in root.glob("worker*.log"))
        result["dropped_messages"] = logs.count(": not claimable")  # duplicates the lease turned away
        services.close()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def summarize(store, clients: Clients, killer: Killer, args, leases: dict, submitted_s: float, wall_s: float) -> dict:
    statuses: Counter[str] = Counter()
    lost = duplicated = missing = resumed = 0
    for job_id in clients.accepted:
        job = store.load_job(job_id)
        if job is None or not job.status.is_terminal:
            lost += 1
            continue
        statuses[job.status.value] += 1
        resumed += job.attempts > 1
        steps = [p["step"] for p in store.metrics_after(job_id, limit=10_000) if "loss" in p]
        duplicated += len(steps) - len(set(steps)) + sum(s > job.steps for s in steps)
        if job.status.value == "succeeded":
            missing += len(set(range(1, job.steps + 1)) - set(steps))
    return {
        "jobs": len(clients.accepted),
        "succeeded": statuses["succeeded"],
        "failed": statuses["failed"],
        "cancelled": statuses["cancelled"],
        "lost": lost,
        "duplicated_steps": duplicated,
        "missing_steps": missing,
        "p50_submit_ms": round(statistics.median(clients.latencies_ms), 1) if clients.latencies_ms else None,
        "p99_submit_ms": round(percentile(clients.latencies_ms, 0.99), 1) if clients.latencies_ms else None,
        "submit_errors": len(clients.errors),
        "rate_limited": clients.rate_limited,
        "kills": killer.kills,
        "resumed_jobs": resumed,
        "submitted_in_s": round(submitted_s, 1),
        "wall_s": round(wall_s, 1),
        "parameters": {
            "jobs": args.jobs,
            "clients": args.clients,
            "workers": args.workers,
            "kill_every_s": args.kill_every,
            "steps_per_job": args.steps,
            **{k.removeprefix("QAA_").lower(): int(v) for k, v in leases.items()},
        },
        "setup": "qaa api + 2 qaa workers (solo pool) on PostgreSQL + Redis, clients as threads, same 2-core CPU",
    }


if __name__ == "__main__":
    main()

"""Bad input: every case is a 4xx problem+json that names what is wrong, and the store is left unchanged."""

from __future__ import annotations

import json

import pytest
from test_api import TINY, submit

from service.deps import get_settings


def spec(**changes):
    out = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = out
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return json.dumps(out).encode()


# (id, method, url, body, status, words the answer must contain, field path or JSONL line it must name)
CASES = [
    ("malformed-json", "POST", "/v1/jobs", b'{"model": "builtin:tiny-llama",', 400, "malformed JSON", None),
    ("empty-body", "POST", "/v1/jobs", b"", 400, "empty", None),
    ("not-utf8", "POST", "/v1/jobs", b'{"model": "\xff\xfe"}', 400, "UTF-8", None),
    ("not-an-object", "POST", "/v1/jobs", b"[1, 2]", 422, "valid dictionary", ""),
    ("missing-model", "POST", "/v1/jobs", b'{"dataset": "builtin:restaurants"}', 422, "required", "model"),
    ("wrong-type", "POST", "/v1/jobs", spec(training__steps="many"), 422, "integer", "training.steps"),
    ("out-of-range", "POST", "/v1/jobs", spec(training__steps=10**9), 422, "100000", "training.steps"),
    ("too-many-qubits", "POST", "/v1/jobs", spec(method__qubits=99), 422, "between 1 and 16", "method.qubits"),
    (
        "unknown-key",
        "POST",
        "/v1/jobs",
        spec(training__learning_rte=0.1),
        422,
        "did you mean 'learning_rate'?",
        "training.learning_rte",
    ),
    ("unknown-backend", "POST", "/v1/jobs", spec(quantum__backend="warp"), 422, "backend must be", "quantum.backend"),
    ("unknown-method", "POST", "/v1/jobs", spec(method__kind="magic"), 422, "qaa", "method"),
    (
        "nan-rate",
        "POST",
        "/v1/jobs",
        b'{"model":"builtin:tiny-llama","dataset":"builtin:restaurants","training":{"learning_rate":NaN}}',
        422,
        "finite",
        "training.learning_rate",
    ),
    ("no-such-dataset", "POST", "/v1/jobs", spec(dataset="ds_0123456789abcdef"), 422, "no dataset", "dataset"),
    ("model-url", "POST", "/v1/jobs", spec(model="https://evil.example/model"), 422, "URL", "model"),
    ("oversized-spec", "POST", "/v1/jobs", b'{"name": "' + b"x" * (1 << 20) + b'"}', 413, "larger than", None),
    ("estimate-bad-width", "POST", "/v1/estimate?d_in=0", spec(), 422, "greater than", "query.d_in"),
    (
        "estimate-no-match",
        "POST",
        "/v1/estimate",
        spec(method__target_modules=["nope"]),
        422,
        "match no module",
        "method.target_modules",
    ),
    (
        "broken-jsonl",
        "POST",
        "/v1/datasets",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": "e", "completion"\n',
        400,
        "line 3: not valid JSON",
        3,
    ),
    (
        "jsonl-missing-field",
        "POST",
        "/v1/datasets",
        b'{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n',
        400,
        "line 2: 'completion'",
        2,
    ),
    ("jsonl-not-object", "POST", "/v1/datasets", b'"just text"\n', 400, "line 1: each line must be a JSON object", 1),
    ("jsonl-not-utf8", "POST", "/v1/datasets", b'{"prompt": "\xff", "completion": "b"}\n', 400, "line 1: not UTF-8", 1),
    ("jsonl-empty", "POST", "/v1/datasets", b"\n\n", 400, "no examples", 0),
    ("oversized-upload", "POST", "/v1/datasets", b'{"prompt": "a", "completion": "b"}\n' * 100, 413, "limit", None),
    (
        "dataset-name-control",
        "POST",
        "/v1/datasets?name=a%0Ab",
        b'{"prompt": "a", "completion": "b"}\n',
        422,
        "pattern",
        "query.name",
    ),
    ("bad-status", "GET", "/v1/jobs?status=sleeping", None, 422, "queued", "query.status.0"),
    ("bad-limit", "GET", "/v1/jobs?limit=0", None, 422, "greater than", "query.limit"),
    ("bad-cursor", "GET", "/v1/jobs?cursor=!!!", None, 400, "invalid cursor", "cursor"),
    ("bad-after-step", "GET", "/v1/jobs/{job}/metrics?after_step=-7", None, 422, "-1", "query.after_step"),
    ("after-step-text", "GET", "/v1/jobs/{job}/metrics?after_step=ten", None, 422, "integer", "query.after_step"),
    ("artifact-dotdot", "GET", "/v1/jobs/{job}/artifacts/..%2F..%2F..%2Fetc%2Fpasswd", None, 400, "'..'", None),
    ("artifact-inner-dotdot", "GET", "/v1/jobs/{job}/artifacts/adapter%2F..%2F..%2Fqaa.db", None, 400, "'..'", None),
    ("artifact-absolute", "GET", "/v1/jobs/{job}/artifacts/%2Fetc%2Fpasswd", None, 400, "relative", None),
    ("artifact-backslash", "GET", "/v1/jobs/{job}/artifacts/..%5C..%5Cqaa.db", None, 400, "backslash", None),
    ("unknown-job", "GET", "/v1/jobs/job_000000000000000000000000", None, 404, "no job", None),
]


def snapshot(api):
    store = api.app.state.store
    datasets_dir = api.app.state.settings.datasets_dir
    files = sorted(p.name for p in datasets_dir.iterdir()) if datasets_dir.exists() else []
    return (
        store.count_jobs_by_status(),
        [d.id for d in store.list_datasets("alice")],
        len(store.list_api_keys()),
        files,
        [(j.id, j.status, j.step) for j in store.list_jobs("alice").jobs],
    )


@pytest.mark.parametrize(
    ("method", "url", "body", "status", "words", "at"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_is_a_4xx_naming_the_problem_and_changes_nothing(api, auth_for, method, url, body, status, words, at):
    alice = auth_for("alice")
    job = submit(api, alice)
    limited = api.app.state.settings.model_copy(update={"max_upload_bytes": 1000})
    api.app.dependency_overrides[get_settings] = lambda: limited
    api.app.state.settings = limited
    before = snapshot(api)

    response = api.request(method, url.format(job=job["id"]), content=body, headers=alice)

    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem = response.json()
    assert problem["status"] == status and words in problem["detail"], problem
    if isinstance(at, str):
        assert at in [e["path"] for e in problem["errors"]], problem
    elif isinstance(at, int):
        assert problem["line"] == at
    assert snapshot(api) == before

"""The API process stays light: importing the app and serving requests loads no torch, transformers or qiskit."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = """
import json, sys
from fastapi.testclient import TestClient
from service.app import app
imported = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "qiskit", "qiskit_aer"))
spec = {"model": "builtin:tiny-llama", "dataset": "builtin:restaurants", "quantum": {"backend": "aer"},
        "training": {"steps": 2}}
with TestClient(app) as client:
    key = json.load(open(app.state.settings.home_dir / "credentials"))["api_key"]
    headers = {"Authorization": "Bearer " + key}
    codes = [
        client.post("/v1/jobs", json=spec, headers=headers).status_code,
        client.post("/v1/estimate", json=spec, headers=headers).status_code,
        client.get("/v1/jobs", headers=headers).status_code,
        client.get("/metrics", headers=headers).status_code,
    ]
served = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "qiskit", "qiskit_aer"))
print(json.dumps({"imported": imported, "served": served, "codes": codes}))
"""


def test_importing_and_serving_the_api_loads_no_heavy_library(tmp_path):
    env = {"QAA_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"imported": [], "served": [], "codes": [201, 200, 200, 200]}

"""`ibm:` backends fail fast with a readable message when they cannot be used (no or bad token, offline)."""

import time

import pytest
from torch import nn

from circuits import QAAConfig, QAALayer
from circuits.backends import environment
from circuits.backends.ibm import BackendUnavailable


@pytest.fixture
def env(tmp_path):
    before = environment.environment()
    yield lambda **kw: environment.configure(cache_dir=tmp_path, **kw)
    environment.configure(**before.__dict__)


def _layer():
    return QAALayer(nn.Linear(8, 2), QAAConfig(backend="ibm:ibm_torino", gradient="parameter-shift"))


def test_no_token_fails_immediately(env):
    env(ibm_token=None)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match="ibm:ibm_torino.*needs an IBM Quantum API token.*QAA_IBM_TOKEN"):
        _layer()
    assert time.monotonic() - start < 1


def test_bad_token_fails_fast_and_says_why(env):
    env(ibm_token="not-a-real-token", connect_timeout_s=8)
    start = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"IBM Quantum|ibm:ibm_torino") as info:
        _layer()
    assert time.monotonic() - start < 10
    assert "not-a-real-token" not in str(info.value)  # secrets never end up in messages

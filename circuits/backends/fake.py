"""The fake IBM backends of `qiskit_ibm_runtime.fake_provider`: names, instances and calibration stamps.

`fake:<Name>` runs through the same runner as hardware (`runtime.RuntimeRunner`), in the runtime's local
testing mode.
"""

from __future__ import annotations


def fake_names() -> list[str]:
    from qiskit_ibm_runtime import fake_provider
    from qiskit_ibm_runtime.fake_provider.fake_backend import FakeBackendV2

    return sorted(
        name
        for name in dir(fake_provider)
        if isinstance(getattr(fake_provider, name), type)
        and issubclass(getattr(fake_provider, name), FakeBackendV2)
        and name not in {"FakeBackendV2"}
    )


def fake_backend(name: str):
    """The fake backend class `name` (e.g. FakeManilaV2) instantiated, or an error listing valid names."""
    from qiskit_ibm_runtime import fake_provider

    names = fake_names()
    if name not in names:
        raise ValueError(f"unknown fake backend {name!r}; available: {', '.join(names)}")
    return getattr(fake_provider, name)()


def calibration_stamp(backend) -> str:
    """Identifies the calibration a transpilation and noise model were made for: version and last update."""
    props = backend.properties()
    updated = props.last_update_date.isoformat() if props is not None else "none"
    return f"{getattr(backend, 'backend_version', '')}@{updated}"

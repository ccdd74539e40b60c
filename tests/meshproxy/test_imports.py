"""Every model and core module imports on its own, first, in a fresh interpreter (an import
cycle between the snapshot model and the security model once made some of them unimportable
unless another module had been imported before)."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = (
    "meshproxy.config.meta",
    "meshproxy.config.model",
    "meshproxy.config.security",
    "meshproxy.core.authz",
    "meshproxy.core.peerauthn",
    "control.istio.security",
    "meshproxy.inbound",
    "meshproxy.tls",
)


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_first(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr

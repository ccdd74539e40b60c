"""Run every async test of a module on both event loops: asyncio's and uvloop's.

The proxy runs on uvloop, but asyncio's loop is the reference implementation (and what a user's
embedding may run), so the TLS and listener tests run on both. pytest-asyncio picks the loop
from the ``event_loop_policy`` fixture; a parametrized one (ids ``asyncio`` and ``uvloop``)
doubles every async test of the module that defines it. pytest finds a fixture a test module
binds at module level, so a module opts in with::

    from tests.support import loops

    pytestmark = loops.OVERRIDE_WARNING
    event_loop_policy = loops.event_loop_policy

(an assignment rather than an import of the name, which linters would call unused).

pytest-asyncio warns that the fixture overrides its own; that is the point, so
:data:`OVERRIDE_WARNING` (the module's ``pytestmark``) silences exactly that warning.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

OVERRIDE_WARNING = pytest.mark.filterwarnings('ignore:Overriding the "event_loop_policy" fixture')


@pytest.fixture(params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """Every async test runs on both loops (the proxy runs on uvloop)."""
    if request.param == "uvloop":
        return uvloop.EventLoopPolicy()
    return asyncio.DefaultEventLoopPolicy()

"""Fixtures shared by the Compute Engine tests: the fake Compute API (``fake``) and
clients pointed at it (``make(**settings)``, ``gce``), and ``one_line``. A test module
imports the ones it uses."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.gcp import api as gcp
from tests.fake_gce import FakeGce


@pytest.fixture
def fake():
    server = FakeGce().start()
    yield server
    server.stop()


@pytest.fixture
def make(tmp_path, fake):
    def make(**overrides):
        values = {"gcp.project": fake.project, "gcp.api_endpoint": fake.endpoint, **overrides}
        gce = gcp.connect(load_settings(root=tmp_path, environ={}, overrides=values))
        gce.poll_interval, gce.request_timeout = 0.0, 2.0
        return gce
    return make


@pytest.fixture
def gce(make):
    return make()


def one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text

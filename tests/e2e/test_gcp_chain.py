"""The Google Cloud path end to end: `inv vm.create` against a local fake of the Compute
API (through the real google-cloud-compute client), whose VM's external IP is the Debian 12
sandbox's loopback address; then `inv deploy --target gcp` finds the host through the API,
pins its host key from guest attributes, and deploys to it.
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.deploy_helpers import copy_source, healthy_now, inv, make_env_file
from tests.fake_gce import FakeGce


@pytest.fixture
def fake():
    gce = FakeGce().start()
    yield gce
    gce.stop()


def test_vm_create_then_deploy_through_the_api(sandbox_bookworm, fake, ssh_run, tmp_path):
    fake.nat_ip = "127.0.0.1"
    host_key = open(sandbox_bookworm["known_hosts"]).read().split()[1:3]
    fake.guest_attributes["nightguard"] = {"hostkeys": {host_key[0]: host_key[1]}}
    copy_source(tmp_path / "src")
    env = {
        "NIGHTGUARD_TARGET": "gcp",
        "NIGHTGUARD_GCP_PROJECT": fake.project,
        "NIGHTGUARD_GCP_API_ENDPOINT": fake.endpoint,
        "NIGHTGUARD_GCP_INSTANCE": "nightguard",
        "NIGHTGUARD_SSH_PORT": str(sandbox_bookworm["port"]),
        "NIGHTGUARD_SSH_KEY_FILENAME": sandbox_bookworm["key_filename"],
        "NIGHTGUARD_SSH_KNOWN_HOSTS": str(tmp_path / "known_hosts"),
        "NIGHTGUARD_ENV_FILE": str(make_env_file(tmp_path)),
        "NIGHTGUARD_SOURCE_DIR": str(tmp_path / "src"),
        # the sandbox cannot pull python:3.x-slim; it preloads this base
        "NIGHTGUARD_BASE_IMAGE": "localhost/nightguard-base:latest",
    }
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}, **env}
    created = inv(["vm.create"], env)
    assert created.returncode == 0, created.stdout + created.stderr
    inserts = fake.sent("POST", "/instances")
    assert len(inserts) == 1
    assert inserts[0].body["machineType"].endswith("/machineTypes/e2-micro")
    deployed = inv(["deploy"], env)
    output = deployed.stdout + deployed.stderr
    assert deployed.returncode == 0, output
    assert "pinned host key of [127.0.0.1]" in output
    assert "gcp nightguard (127.0.0.1)" in output
    assert healthy_now(ssh_run, sandbox_bookworm)
    pinned = (tmp_path / "known_hosts").read_text()
    assert host_key[1] in pinned

"""ssh_config resolution without a server: hop specs, precedence, loops and bad files are
one-line errors (the connections themselves: test_remote_sshd.py)."""

from __future__ import annotations

import pytest

from tasks.config import load_settings
from tasks.errors import ConfigError
from tasks.ssh import sshconfig
from tasks.ssh.address import SshTarget
from tasks.ssh.hostkeys import pin_command


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    (path / ".ssh").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.setattr(sshconfig, "SYSTEM_CONFIG", str(tmp_path / "none"))
    return path


def target(tmp_path, home, config: str, **more):
    (home / ".ssh" / "config").write_text(config)
    settings = load_settings(root=tmp_path, environ={},
                             overrides={"target": "ssh", "ssh.host": "box", **more})
    return sshconfig.ssh_target(settings)


@pytest.mark.parametrize(("spec", "expected"), [
    ("bastion", (None, "bastion", None)),
    ("me@bastion:2222", ("me", "bastion", 2222)),
    ("ssh://me@bastion:2222", ("me", "bastion", 2222)),
    ("me@[2001:db8::1]:2222", ("me", "2001:db8::1", 2222)),
    ("2001:db8::1", (None, "2001:db8::1", None)),
])
def test_hop_specs(spec, expected):
    found = sshconfig.parse_host(spec)
    assert (found.user, found.host, found.port) == expected


def test_nothing_configured_means_the_settings(tmp_path, home):
    found = target(tmp_path, home, "")
    assert (found.host, found.port, found.user) == ("box", 22, "ubuntu")
    assert found.jump is None and not found.proxy_command
    assert found.other_known_hosts[0] == str(home / ".ssh" / "known_hosts")
    assert found.known_hosts == str(tmp_path / ".ssh" / "known_hosts")


def test_first_value_wins_and_host_star_applies(tmp_path, home):
    found = target(tmp_path, home, "Host box\n  Port 2201\nHost *\n  Port 2202\n  User all\n"
                   "  UserKnownHostsFile ~/.ssh/mine\n")
    assert (found.port, found.user) == (2201, "all")
    assert found.other_known_hosts[0] == str(home / ".ssh" / "mine")


def test_a_chain_of_jumps_is_ordered_first_hop_outermost(tmp_path, home):
    found = target(tmp_path, home, "Host box\n  ProxyJump a,b:2200\nHost a\n  HostName 10.0.0.1\n"
                   "  ProxyJump outer\nHost b\n  User bee\n")
    assert (found.jump.host, found.jump.port, found.jump.user) == ("b", 2200, "bee")
    assert found.jump.jump.host == "10.0.0.1"
    assert found.jump.jump.jump.host == "outer"  # the first hop follows its own ProxyJump


def test_a_jump_loop_is_one_line(tmp_path, home):
    with pytest.raises(ConfigError, match="more than 8 hops"):
        target(tmp_path, home, "Host box a\n  ProxyJump a\n")


@pytest.mark.parametrize(("config", "expected"), [
    ("Host box\n  Port ssh\n", "~/.ssh/config: Host box: Port 'ssh' is not a number"),
    ("Host box\n  ProxyJump a:b\n", "ProxyJump a:b: 'b' is not a port number (1-65535)"),
    ("Host\n", "~/.ssh/config: "),
])
def test_bad_ssh_config_is_one_line(tmp_path, home, config, expected):
    with pytest.raises(ConfigError) as info:
        target(tmp_path, home, config)
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_proxycommand_none_and_proxyjump_none(tmp_path, home):
    found = target(tmp_path, home, "Host box\n  ProxyJump none\n  ProxyCommand none\n")
    assert found.jump is None and found.proxy_command == ""


def test_missing_identity_files_are_skipped(tmp_path, home):
    (home / ".ssh" / "here").write_text("")
    found = target(tmp_path, home, "Host box\n  IdentityFile ~/.ssh/here\n"
                                   "  IdentityFile ~/.ssh/gone\n")
    assert found.identity_files == (str(home / ".ssh" / "here"),)


def test_pin_command_for_a_key_type(tmp_path):
    import paramiko

    key = paramiko.ECDSAKey.generate()
    known = tmp_path / "known_hosts"
    known.write_text("")
    command = pin_command(SshTarget("203.0.113.7", 22, "u", known_hosts=str(known)), key)
    assert command == f"ssh-keyscan -t ecdsa -p 22 203.0.113.7 >> {known}"


def test_targets_the_low_layer_cannot_address_are_resolved_by_what_the_root_registers(
        tmp_path, home, monkeypatch):
    from tasks.gcp import ssh as gcp_ssh
    from tasks.sandbox import machine
    from tasks.ssh import targets

    assert targets.RESOLVERS == {"sandbox": machine.ssh_target, "gcp": gcp_ssh.resolve_target}
    (home / ".ssh" / "config").write_text("Host box\n    HostName 192.0.2.9\n")

    def settings(kind, **more):
        return load_settings(root=tmp_path, environ={}, overrides={
            "target": kind, "ssh.host": "box", "gcp.project": "p", **more})

    # an explicit host on target gcp (an IAP tunnel's alias): ssh_config decides, no API call
    assert gcp_ssh.resolve_target(settings("gcp")) is None
    asked = []
    monkeypatch.setattr(targets, "RESOLVERS", {
        "gcp": lambda settings: asked.append("gcp") or None,  # declines
        "sandbox": lambda settings: SshTarget("127.0.0.1", 2222, "ng", label="sandbox x")})
    for kind, expected in (("sandbox", "sandbox x"), ("gcp", "ubuntu@192.0.2.9:22 (box)"),
                           ("ssh", "ubuntu@192.0.2.9:22 (box)")):
        assert targets.resolve_target(settings(kind)).describe() == expected
    assert asked == ["gcp"]

"""Secret values from a command and from Google Secret Manager (a local fake of its REST
API, through Google's real client): values read, failures in one line naming the secret,
and the values masked later by tasks that never read the store."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.config import load_settings
from tasks.deploy.envfile import redaction
from tasks.deploy.fingerprints import Fingerprints, record
from tasks.deploy.secretstore import load_secret_values
from tasks.errors import ConfigError
from tests.fake_secretmanager import FakeSecretManager

TOKEN = "123456:tg-store-token-Qm4"
GEMINI = "AIzaSy-from-the-store-Kp8"
PROJECT = "ng-proj"


@pytest.fixture
def fake():
    server = FakeSecretManager().start()
    server.add(PROJECT, "gemini-key", "an-older-value-1")
    server.add(PROJECT, "gemini-key", GEMINI + "\n")  # `gcloud ... --data-file` keeps a newline
    yield server
    server.stop()


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "print-secret.py"
    path.write_text(body)
    return f"{sys.executable} {path}"


def settings_for(tmp_path: Path, secrets: dict, fake: FakeSecretManager | None = None):
    environ = {"NIGHTGUARD_SECRETS": json.dumps(secrets)}
    if fake:
        environ["NIGHTGUARD_GCP_SECRETS_ENDPOINT"] = fake.endpoint
    return load_settings(root=tmp_path, environ=environ)


def error_of(settings) -> str:
    with pytest.raises(ConfigError) as caught:
        load_secret_values(settings)
    message = str(caught.value)
    assert "\n" not in message
    for value in (TOKEN, GEMINI):
        assert value not in message
    return message


def test_one_value_from_a_command_and_one_from_secret_manager_without_a_dotenv(tmp_path, fake):
    command = script(tmp_path, f"print({TOKEN!r})")
    settings = settings_for(tmp_path, {
        "telegram_bot_token": {"command": command},
        "gemini_api_key": {"gcp": f"projects/{PROJECT}/secrets/gemini-key"}}, fake)
    assert not (tmp_path / ".env").exists()  # .env is needed only when an entry names it
    values = load_secret_values(settings)
    assert values.values == {"telegram_bot_token": TOKEN, "gemini_api_key": GEMINI}
    assert repr(values) == "SecretValues(['gemini_api_key', 'telegram_bot_token'])"
    assert fake.accessed == 1
    assert fake.requests == [("GET", f"/v1/projects/{PROJECT}/secrets/gemini-key/versions/"
                                     "latest:access")]


def test_a_pinned_version_is_read_as_pinned(tmp_path, fake):
    settings = settings_for(tmp_path, {"k": {"gcp": f"projects/{PROJECT}/secrets/gemini-key/"
                                                   "versions/1"}}, fake)
    assert load_secret_values(settings).values == {"k": "an-older-value-1"}


def test_a_command_runs_without_a_shell(tmp_path):
    marker = tmp_path / "expanded"
    # `;` and `>` are plain words without a shell: the command prints them, creates nothing
    settings = settings_for(tmp_path, {"k": {"command": f"echo tok-1 ; touch {marker}"}})
    assert load_secret_values(settings).values == {"k": f"tok-1 ; touch {marker}"}
    assert not marker.exists()


@pytest.mark.parametrize(("body", "reason"), [
    ("import sys; sys.stderr.write('op: not signed in\\nop: [ERROR] 401 token expired\\n'); "
     "sys.exit(3)", "failed (exit 3): op: [ERROR] 401 token expired"),
    ("print('')", "printed no value"),
    ("print('a'); print('b')", "printed several lines"),
])
def test_a_failing_command_is_one_line_naming_the_secret(tmp_path, body, reason):
    settings = settings_for(tmp_path, {"gemini_api_key": {"command": script(tmp_path, body)}})
    message = error_of(settings)
    assert message.startswith("secret gemini_api_key: command `") and reason in message


def test_a_missing_program_is_named(tmp_path):
    settings = settings_for(tmp_path, {"k": {"command": "no-such-password-manager read k"}})
    assert error_of(settings) == ("secret k: no-such-password-manager not found (install it, "
                                  "or fix nightguard.secrets)")


def test_a_command_that_hangs_is_ended_with_its_children(tmp_path):
    child_pid = tmp_path / "child.pid"
    body = ("import os, subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
            "time.sleep(60)\n")
    settings = settings_for(tmp_path, {"k": {"command": script(tmp_path, body),
                                             "timeout": "2s"}})
    started = time.monotonic()
    message = error_of(settings)
    assert time.monotonic() - started < 10
    assert message.startswith("secret k: command `") and "gave no value within 2s" in message
    pid = int(child_pid.read_text())  # precondition: the grandchild really ran
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the command's child outlived the time-out")


def test_a_value_in_the_commands_error_is_not_shown(tmp_path):
    body = f"print({TOKEN!r}); import sys; sys.stderr.write('bad: {TOKEN}\\n'); sys.exit(1)"
    message = error_of(settings_for(tmp_path, {"k": {"command": script(tmp_path, body)}}))
    assert message.endswith("failed (exit 1): bad: [REDACTED]")


@pytest.mark.parametrize(("setup", "ref", "reason"), [
    (lambda f: None, f"projects/{PROJECT}/secrets/absent",
     f"secret k: projects/{PROJECT}/secrets/absent/versions/latest not found in Google Secret "
     "Manager (create it: `gcloud secrets create absent --data-file=-`, or fix "
     "nightguard.secrets)"),
    (lambda f: f.deny.add("gemini-key"), f"projects/{PROJECT}/secrets/gemini-key",
     f"secret k: permission denied reading projects/{PROJECT}/secrets/gemini-key/versions/"
     f"latest - grant your account roles/secretmanager.secretAccessor on projects/{PROJECT}/"
     "secrets/gemini-key (and check the Secret Manager API is enabled)"),
    (lambda f: f.disabled.add((PROJECT, "gemini-key", 2)), f"projects/{PROJECT}/secrets/"
     "gemini-key/versions/2", "is disabled or destroyed"),
    (lambda f: f.add(PROJECT, "blank", "  "), f"projects/{PROJECT}/secrets/blank",
     f"secret k: projects/{PROJECT}/secrets/blank/versions/latest holds an empty value"),
])
def test_secret_manager_failures_are_one_line(tmp_path, fake, setup, ref, reason):
    setup(fake)
    message = error_of(settings_for(tmp_path, {"k": {"gcp": ref}}, fake))
    assert message == reason or (reason in message and message.startswith("secret k: "))


def test_secret_manager_unreachable_or_silent(tmp_path, fake):
    gone = FakeSecretManager().start()
    endpoint = gone.endpoint
    gone.stop()
    settings = load_settings(root=tmp_path, environ={
        "NIGHTGUARD_SECRETS": json.dumps({"k": {"gcp": f"projects/{PROJECT}/secrets/x"}}),
        "NIGHTGUARD_GCP_SECRETS_ENDPOINT": endpoint})
    assert error_of(settings) == (f"secret k: cannot reach Google Secret Manager at {endpoint}:"
                                  " check the network or nightguard.gcp.secrets_endpoint")
    fake.hang = True
    silent = settings_for(tmp_path, {"k": {"gcp": f"projects/{PROJECT}/secrets/gemini-key",
                                           "timeout": "1s"}}, fake)
    started = time.monotonic()
    assert error_of(silent) == ("secret k: no answer from Google Secret Manager at "
                                f"{fake.endpoint} in time - retry")
    assert time.monotonic() - started < 15


def test_store_values_are_masked_later_by_their_fingerprints_alone(tmp_path, fake):
    settings = settings_for(tmp_path, {
        "telegram_bot_token": {"command": script(tmp_path, f"print({TOKEN!r})")},
        "gemini_api_key": {"gcp": f"projects/{PROJECT}/secrets/gemini-key"}}, fake)
    load_secret_values(settings)
    stored = tmp_path / ".nightguard" / "secret-fingerprints.json"
    assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    text = stored.read_text()
    assert TOKEN not in text and GEMINI not in text and TOKEN[:8] not in text
    # a later task (inv logs, health) reads no store: only the file
    later = redaction(settings)
    assert later.values == {}
    log = f"GET https://api.telegram.org/bot{TOKEN}/getUpdates ok\nkey={GEMINI} x{TOKEN}y"
    assert later.redact(log) == ("GET https://api.telegram.org/bot[REDACTED]/getUpdates ok\n"
                                 "key=[REDACTED] x[REDACTED]y")
    assert later.redact("nothing secret here") == "nothing secret here"


def test_fingerprints_keep_the_last_ten_per_secret(tmp_path):
    path = tmp_path / "prints.json"
    for i in range(12):
        record(path, {"k": f"value-number-{i:02d}"})
    prints = Fingerprints.load(path)
    assert prints.redact("value-number-11 value-number-02") == "[REDACTED] [REDACTED]"
    assert prints.redact("value-number-01") == "value-number-01"  # the 11th oldest is gone
    spaced = tmp_path / "spaced.json"
    record(spaced, {"k": "a pass phrase"})
    assert Fingerprints.load(spaced).redact("is a pass phrase.") == "is [REDACTED]."


def run_inv(tmp_path: Path, *args: str, **extra: str):
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NIGHTGUARD_")}
    environ.update({"NIGHTGUARD_ENV_FILE": str(tmp_path / ".env"),
                    "NIGHTGUARD_FINGERPRINTS_FILE": str(tmp_path / "prints.json"), **extra})
    inv = Path(sys.executable).parent / "inv"
    root = Path(__file__).resolve().parents[2]
    return subprocess.run([str(inv), *args], cwd=root, env=environ, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)


def test_to_gcp_moves_the_dotenv_values_and_prints_the_config_that_reads_them(tmp_path, fake):
    env = tmp_path / ".env"
    env.write_text(f"TELEGRAM_BOT_TOKEN={TOKEN}\nGEMINI_API_KEY={GEMINI}\n")
    env.chmod(0o600)
    done = run_inv(tmp_path, "secrets.to-gcp", "--project", PROJECT,
                   NIGHTGUARD_GCP_SECRETS_ENDPOINT=fake.endpoint)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert TOKEN not in output and GEMINI not in output
    assert fake.secrets[(PROJECT, "telegram_bot_token")] == [TOKEN]
    assert fake.secrets[(PROJECT, "gemini_api_key")] == [GEMINI]
    assert f"stored gemini_api_key as projects/{PROJECT}/secrets/gemini_api_key/versions/1" \
        in output
    assert f"      telegram_bot_token: {{gcp: projects/{PROJECT}/secrets/telegram_bot_token}}" \
        in done.stdout
    # the printed config reads the same values back, with no .env at all
    env.unlink()
    secrets = {"telegram_bot_token": {"gcp": f"projects/{PROJECT}/secrets/telegram_bot_token"},
               "gemini_api_key": {"gcp": f"projects/{PROJECT}/secrets/gemini_api_key"}}
    settings = settings_for(tmp_path, secrets, fake)
    assert load_secret_values(settings).values == {"telegram_bot_token": TOKEN,
                                                   "gemini_api_key": GEMINI}


def test_inv_config_names_each_source_and_never_a_value(tmp_path, fake):
    secrets = {"telegram_bot_token": {"command": script(tmp_path, f"print({TOKEN!r})")},
               "gemini_api_key": {"gcp": f"projects/{PROJECT}/secrets/gemini-key"}}
    done = run_inv(tmp_path, "config", NIGHTGUARD_SECRETS=json.dumps(secrets),
                   NIGHTGUARD_GCP_SECRETS_ENDPOINT=fake.endpoint)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert fake.accessed == 1  # the check really read the store
    assert TOKEN not in output and GEMINI not in output
    assert "secret telegram_bot_token <- command: " in done.stdout
    assert (f"secret gemini_api_key <- Google Secret Manager projects/{PROJECT}/secrets/"
            "gemini-key/versions/latest: [REDACTED]") in done.stdout
    assert "secrets check: ok" in done.stdout
    fake.deny.add("gemini-key")
    denied = run_inv(tmp_path, "config", NIGHTGUARD_SECRETS=json.dumps(secrets),
                     NIGHTGUARD_GCP_SECRETS_ENDPOINT=fake.endpoint)
    assert denied.returncode == 0
    assert "secrets check: secret gemini_api_key: permission denied reading" in denied.stdout


def test_a_bad_source_stops_a_deploy_before_any_connection(tmp_path):
    secrets = {"telegram_bot_token": {"command": "false"}, "gemini_api_key": "GEMINI_API_KEY"}
    (tmp_path / ".env").write_text(f"GEMINI_API_KEY={GEMINI}\n")
    (tmp_path / ".env").chmod(0o600)
    done = run_inv(tmp_path, "deploy", "--host", "192.0.2.1",
                   NIGHTGUARD_SECRETS=json.dumps(secrets))
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.strip().splitlines()[-1] == \
        "error: secret telegram_bot_token: command `false` failed (exit 1)"


def test_a_command_that_would_prompt_gets_eof_at_once_not_the_callers_stdin(tmp_path):
    # the caller's stdin stays open and silent (a terminal nobody types into): the command
    # must not wait on it until its time-out
    body = "import sys; line = sys.stdin.readline(); print('eof' if line == '' else 'read')"
    caller = ("import json, sys\n"
              "from pathlib import Path\n"
              "from tasks.config import load_settings\n"
              "from tasks.deploy.secretstore import load_secret_values\n"
              "entry = {'k': {'command': sys.argv[2], 'timeout': '20s'}}\n"
              "s = load_settings(root=Path(sys.argv[1]),\n"
              "                  environ={'NIGHTGUARD_SECRETS': json.dumps(entry)})\n"
              "print(load_secret_values(s).values['k'])\n")
    root = Path(__file__).resolve().parents[2]
    started = time.monotonic()
    with subprocess.Popen([sys.executable, "-c", caller, str(tmp_path), script(tmp_path, body)],
                          cwd=root, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as proc:
        proc.wait(timeout=30)  # not communicate(): it would close the stdin kept open here
        out, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0, err
    assert out.strip() == "eof"
    assert time.monotonic() - started < 15


def test_an_unexpected_store_error_names_its_code_once(tmp_path):
    from google.api_core import exceptions as api_exceptions

    from tasks.gcp.secretmanager import explain

    settings = settings_for(tmp_path, {"k": "K"})
    boom = api_exceptions.InternalServerError("GET http://x/v1/p: backend error")
    assert explain(settings, "secret k", "projects/p/secrets/s/versions/latest", boom) == \
        "secret k: Google Secret Manager error 500: backend error"
    assert explain(settings, "secret k", "ref", ValueError("odd")) == \
        "secret k: Google Secret Manager error: odd"


def test_a_store_value_repeated_in_agent_env_stops_the_deploy_before_anything(tmp_path):
    from tasks.deploy.pipeline import preflight

    environ = {"NIGHTGUARD_SECRETS": json.dumps({
        "telegram_bot_token": {"command": script(tmp_path, f"print({TOKEN!r})")}}),
        "NIGHTGUARD_AGENT_ENV": json.dumps({"BOT_URL": f"https://x/bot{TOKEN}/"})}
    settings = load_settings(root=tmp_path, environ=environ)
    with pytest.raises(ConfigError) as caught:
        preflight(settings)
    assert str(caught.value).startswith("nightguard.agent_env.BOT_URL holds a secret's value")
    assert TOKEN not in str(caught.value)

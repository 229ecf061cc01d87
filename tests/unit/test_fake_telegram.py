"""The fake Telegram Bot API and Gemini server (tests/fakes/telegram_api.py), over real HTTP."""

import json
import socket
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.fakes.telegram_api import CONFLICT, GEMINI_PREFIX, FakeTelegram

TOKEN = "123456:fake-token"
KEY = "gemini-test-key"


@pytest.fixture
def fake():
    server = FakeTelegram(TOKEN, gemini_key=KEY).start()
    yield server
    server.stop()


def call(url, params=None, body="json", headers=None, timeout=10):
    """(status, decoded JSON) of a POST with ``params`` as JSON, a form, or a query."""
    headers = dict(headers or {})
    data = None
    if params is not None and body == "json":
        data = json.dumps(params).encode()
        headers["Content-Type"] = "application/json"
    elif params is not None and body == "form":
        data = urllib.parse.urlencode(params).encode()
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    elif params is not None:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def bot(fake, method, params=None, body="json", token=TOKEN):
    return call(f"{fake.base_url}{token}/{method}", params, body)


def in_thread(fn, *args, **kwargs):
    """Start fn in a thread; returns a dict that gets "result" (or "error") and "done_at"."""
    box = {}

    def run():
        try:
            box["result"] = fn(*args, **kwargs)
        except Exception as exc:
            box["error"] = exc
        box["done_at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    box["thread"] = thread
    return box


def test_urls_and_bind_address():
    with FakeTelegram(TOKEN, host="0.0.0.0") as fake:
        assert fake.port > 0
        assert fake.base_url == f"http://127.0.0.1:{fake.port}/bot"
        assert fake.url_for("10.0.2.2") == f"http://10.0.2.2:{fake.port}/bot"
        assert fake.gemini_url_for("10.0.2.2") == f"http://10.0.2.2:{fake.port}"
        status, body = bot(fake, "getMe")
        assert status == 200 and body["result"]["id"] == 123456 and body["result"]["is_bot"]


def test_wrong_token_is_unauthorized(fake):
    status, body = bot(fake, "getMe", token="123456:wrong")
    assert status == 401
    assert body == {"ok": False, "error_code": 401, "description": "Unauthorized"}
    assert [(r.method, r.authorized) for r in fake.requests] == [("getMe", False)]
    assert fake.getupdates_intervals() == []


def test_simple_methods(fake):
    assert bot(fake, "deleteWebhook", {"drop_pending_updates": False}) == (
        200,
        {"ok": True, "result": True},
    )
    status, body = bot(fake, "getWebhookInfo")
    assert status == 200 and body["result"]["url"] == ""
    assert bot(fake, "setMyCommands", {"commands": "[]"}, body="form")[1]["result"] is True


def test_drop_pending_updates_forgets_them(fake):
    fake.send_user_message("a")
    assert bot(fake, "deleteWebhook", {"drop_pending_updates": "false"}, body="form")[0] == 200
    assert len(fake.pending_updates()) == 1
    assert bot(fake, "deleteWebhook", {"drop_pending_updates": "true"}, body="form")[0] == 200
    assert fake.pending_updates() == []
    assert bot(fake, "getUpdates")[1]["result"] == []


def test_long_poll_holds_until_an_update_arrives(fake):
    box = in_thread(bot, fake, "getUpdates", {"timeout": 5})
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    time.sleep(0.3)
    assert "result" not in box  # still held
    sent_at = time.monotonic()
    update = fake.send_user_message("hello")
    box["thread"].join(2)
    status, body = box["result"]
    assert status == 200 and body["result"] == [update]
    assert box["done_at"] - sent_at < 0.5
    assert body["result"][0]["message"]["text"] == "hello"
    # The fake notes the end just after it wrote the answer the client may already have.
    assert fake.wait_for(lambda: fake.getupdates_intervals(), 2)
    ((start, end, peer),) = fake.getupdates_intervals()
    assert end - start >= 0.3 and peer[0] == "127.0.0.1"


def test_long_poll_times_out_empty(fake):
    began = time.monotonic()
    status, body = bot(fake, "getUpdates", {"timeout": "0.3"}, body="query")
    assert (status, body) == (200, {"ok": True, "result": []})
    assert 0.3 <= time.monotonic() - began < 2


def test_offset_confirms_and_limit_caps(fake):
    first, second, third = (fake.send_user_message(t) for t in ("a", "b", "c"))
    ids = [u["update_id"] for u in (first, second, third)]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [u["message"]["message_id"] for u in (first, second, third)] == [1, 2, 3]

    # Without an offset nothing is confirmed: the same updates come again.
    for _ in range(2):
        assert bot(fake, "getUpdates")[1]["result"] == [first, second, third]
    assert bot(fake, "getUpdates", {"limit": 1})[1]["result"] == [first]
    # offset N confirms every update below N (form values are strings, as PTB sends them).
    got = bot(fake, "getUpdates", {"offset": str(ids[1])}, body="form")[1]["result"]
    assert got == [second, third]
    assert fake.pending_updates() == [second, third]
    assert bot(fake, "getUpdates", {"offset": ids[2] + 1})[1]["result"] == []
    assert fake.pending_updates() == []


def test_newer_getupdates_ends_the_older_with_409(fake):
    older = in_thread(bot, fake, "getUpdates", {"timeout": 5})
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    assert fake.conflicts == 0
    began = time.monotonic()
    newer = in_thread(bot, fake, "getUpdates", {"timeout": 1})
    older["thread"].join(2)
    assert older["result"] == (409, {"ok": False, "error_code": 409, "description": CONFLICT})
    assert older["done_at"] - began < 0.5
    assert fake.conflicts == 1
    update = fake.send_user_message("for the newer one")
    newer["thread"].join(2)
    assert newer["result"] == (200, {"ok": True, "result": [update]})
    assert fake.conflicts == 1
    assert fake.wait_for(lambda: len(fake.getupdates_intervals()) == 2, 2)
    intervals = fake.getupdates_intervals()
    assert len(intervals) == 2 and intervals[0][2] != intervals[1][2]  # two connections


def test_a_poller_that_hung_up_is_no_conflict(fake):
    # A stopping poller cancels its long poll (closes the connection), then calls
    # getUpdates once more to confirm what it fetched: that must not count as a conflict.
    raw = socket.create_connection(("127.0.0.1", fake.port))
    raw.sendall(f"GET /bot{TOKEN}/getUpdates?timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    raw.close()
    assert bot(fake, "getUpdates", {"timeout": 0}) == (200, {"ok": True, "result": []})
    assert fake.conflicts == 0
    held = [r for r in fake.requests if r.method == "getUpdates"][0]
    assert fake.wait_for(lambda: held.end is not None, 2)
    assert held.status == 0  # given up, never answered


def test_send_message_records_replies(fake):
    first = fake.send_user_message("one", chat_id=7)
    second = fake.send_user_message("two", chat_id=7)
    fake.send_user_message("three", chat_id=7)
    assert len(fake.unanswered()) == 3 and fake.replies() == []

    # PTB style: a form with reply_parameters as a JSON string.
    status, body = bot(
        fake,
        "sendMessage",
        {"chat_id": "7", "text": "re one", "reply_parameters": json.dumps({"message_id": 1})},
        body="form",
    )
    assert status == 200
    message = body["result"]
    assert message["text"] == "re one" and message["chat"]["id"] == 7
    assert message["message_id"] > 3
    # JSON body with the older reply_to_message_id, twice for the same message.
    for _ in range(2):
        assert (
            bot(fake, "sendMessage", {"chat_id": 7, "text": "re two", "reply_to_message_id": 2})[0]
            == 200
        )
    assert bot(fake, "sendMessage", {"chat_id": 7, "text": ""})[0] == 400

    replies = fake.replies()
    assert [(r.chat_id, r.text, r.reply_to) for r in replies] == [
        (7, "re one", 1),
        (7, "re two", 2),
        (7, "re two", 2),
    ]
    assert [u["message"]["text"] for u in fake.unanswered()] == ["three"]
    assert fake.answered_twice() == [second]
    assert first not in fake.unanswered()


def test_wait_for_times_out_falsy(fake):
    began = time.monotonic()
    assert not fake.wait_for(lambda: fake.replies(), 0.2)
    assert time.monotonic() - began >= 0.2


def test_stop_ends_a_held_poll():
    fake = FakeTelegram(TOKEN).start()
    box = in_thread(bot, fake, "getUpdates", {"timeout": 30})
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    fake.stop()
    box["thread"].join(3)
    assert not box["thread"].is_alive()
    assert box["result"] == (200, {"ok": True, "result": []})


def test_deaf_holds_getupdates_with_the_connection_open(fake):
    held = in_thread(bot, fake, "getUpdates", {"timeout": 5})
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    fake.set_deaf()  # an open poll is held too
    fake.send_user_message("waiting")  # would be answered at once if the fake listened
    fresh = in_thread(call, f"{fake.base_url}{TOKEN}/getUpdates", {"timeout": 0}, timeout=1.0)
    fresh["thread"].join(3)
    assert isinstance(fresh.get("error"), TimeoutError)  # the client gave up, no answer
    assert "result" not in held and held["thread"].is_alive()
    assert fake.deaf_polls == 2
    # Other methods still answer: only delivery stopped.
    assert bot(fake, "getMe")[0] == 200
    fake.set_deaf(False)
    held["thread"].join(3)
    status, body = held["result"]
    assert status == 200 and [u["message"]["text"] for u in body["result"]] == ["waiting"]


def test_stop_ends_a_deaf_poll():
    fake = FakeTelegram(TOKEN).start()
    fake.set_deaf()
    box = in_thread(bot, fake, "getUpdates", {"timeout": 30})
    assert fake.wait_for(lambda: fake.deaf_polls, 2)
    fake.stop()
    box["thread"].join(3)
    assert not box["thread"].is_alive() and "error" in box


def test_revoked_answers_401_to_every_call_held_polls_too(fake):
    held = in_thread(bot, fake, "getUpdates", {"timeout": 30})
    assert fake.wait_for(lambda: fake.open_polls(), 2)
    fake.set_revoked()
    held["thread"].join(3)
    unauthorized = (401, {"ok": False, "error_code": 401, "description": "Unauthorized"})
    assert held["result"] == unauthorized
    for method in ("getMe", "getUpdates", "sendMessage", "deleteWebhook"):
        assert bot(fake, method, {"chat_id": 1, "text": "x"}) == unauthorized
    assert [(r.method, r.status) for r in fake.calls("getMe", "getUpdates")] == [
        ("getUpdates", 401),
        ("getMe", 401),
        ("getUpdates", 401),
    ]
    fake.set_revoked(False)
    assert bot(fake, "getMe")[0] == 200


def gemini(fake, prompt, headers, model="gemini-2.0-flash", query=""):
    url = f"{fake.gemini_base_url}/v1beta/models/{model}:generateContent{query}"
    body = {"contents": [{"role": "user", "parts": [{"text": prompt}]}]}
    return call(url, body, headers=headers)


def test_gemini_answers_from_the_prompt(fake):
    status, body = gemini(fake, "what time is it", {"x-goog-api-key": KEY})
    assert status == 200
    assert body["candidates"][0]["content"]["parts"][0]["text"] == GEMINI_PREFIX + "what time is it"
    (call_,) = fake.gemini_calls()
    assert (call_.model, call_.prompt, call_.status, call_.key_in_url) == (
        "gemini-2.0-flash",
        "what time is it",
        200,
        False,
    )


def test_gemini_rejects_missing_and_wrong_keys(fake):
    # As Google does: no key is 403 PERMISSION_DENIED, a wrong key 400 API_KEY_INVALID.
    status, body = gemini(fake, "hi", {})
    assert status == 403 and body["error"]["status"] == "PERMISSION_DENIED"
    status, body = gemini(fake, "hi", {"x-goog-api-key": "wrong"})
    assert status == 400 and body["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    status, _ = gemini(fake, "hi", {}, query=f"?key={KEY}")
    assert status == 200
    assert [(c.status, c.key_in_url) for c in fake.gemini_calls()] == [
        (403, False),
        (400, False),
        (200, True),
    ]
    assert all("key" not in r.params for r in fake.requests)


def test_gemini_failures_on_request(fake):
    fake.fail_gemini(1)
    assert gemini(fake, "hi", {"x-goog-api-key": KEY})[0] == 503
    assert gemini(fake, "hi", {"x-goog-api-key": KEY})[0] == 200

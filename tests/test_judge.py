"""LLM judge: reply parsing, order folding, retry/backoff, rate limit, cache, and a round trip through a
local OpenAI-compatible server (http.server on 127.0.0.1, stopped after each test)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from click.testing import CliRunner

from dschat.utils.errors import UserError
from mpo_ext.judge import (
    JudgeClient,
    PairVerdict,
    RateLimiter,
    backoff_delay,
    build_messages,
    cache_key,
    chat_completions_url,
    fold_orders,
    parse_scores,
    summarize_verdicts,
)


def free_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("reply, expected", [
    ("Reply 1 is clear.\nSCORES: 7 3", (7.0, 3.0)),
    ("scores: 8.5, 6", (8.5, 6.0)),
    ("Scores: [9, 2]", (9.0, 2.0)),
    ("**SCORES:** 10 0", (10.0, 0.0)),
    ("I'd give 8/10 and 6/10.\nScore: 8/10 and 6/10", (8.0, 6.0)),
    ("7 4\nReply 1 is more complete.", (7.0, 4.0)),  # the "two numbers on a line" style
    ("SCORES: 1 2\nOn reflection:\nSCORES: 6 5", (6.0, 5.0)),  # last SCORES line wins
])
def test_parse_scores_good(reply, expected):
    assert parse_scores(reply) == expected


@pytest.mark.parametrize("reply", [
    "", None, "Both replies are fine.", "SCORES: 7", "SCORES: 11 3", "SCORES: -1 5",
    "SCORES: <score of reply 1> <score of reply 2>", "Reply 1 gets 7 points while reply 2 gets 3 and 4.",
])
def test_parse_scores_malformed(reply):
    assert parse_scores(reply) is None


def test_build_messages_has_both_answers_in_order():
    messages = build_messages("\n\nHuman: hi\n\nAssistant:", "first answer", "second answer")
    user = messages[-1]["content"]
    assert messages[0]["role"] == "system" and messages[-1]["role"] == "user"
    assert user.index("first answer") < user.index("second answer")
    assert "SCORES:" in user and "0 to 10" in user


# --------------------------------------------------------------------------------------------- folding


def test_fold_orders_cancels_position_bias():
    # True scores a=6, b=4; the judge adds +1 to whichever reply is shown first. Each answer is shown
    # first once, so both get +0.5 and the difference is the true one.
    ab, ba = (7.0, 4.0), (5.0, 6.0)
    assert fold_orders(ab, ba) == (6.5, 4.5)
    assert fold_orders(ab, None) == (7.0, 4.0)
    assert fold_orders(None, ba) == (6.0, 5.0)
    assert fold_orders(None, None) == (None, None)


def test_verdict_outcomes_and_summary():
    win = PairVerdict(6.0, 4.0, (7.0, 4.0), (5.0, 6.0))
    tie = PairVerdict(5.0, 5.0, (6.0, 5.0), (6.0, 4.0))  # each order prefers the first shown: inconsistent
    lose = PairVerdict(2.0, 8.0, (2.0, 8.0), None)
    bad = PairVerdict(None, None, None, None)
    assert [v.outcome() for v in (win, tie, lose, bad)] == ["win", "tie", "lose", "invalid"]
    assert win.outcome(tie_margin=2.0) == "tie"
    assert win.position_consistent is True and tie.position_consistent is False
    assert lose.position_consistent is None
    s = summarize_verdicts([win, tie, lose, bad])
    assert (s["win"], s["tie"], s["lose"], s["invalid"], s["n"], s["n_valid"]) == (1, 1, 1, 1, 4, 3)
    assert s["win_rate"] == pytest.approx(1 / 3)
    assert s["position_consistency"] == pytest.approx(0.5)
    assert s["mean_score_a"] == pytest.approx(13 / 3)


# --------------------------------------------------------------------------------------------- plumbing


def test_backoff_delay_doubles_and_caps():
    assert [backoff_delay(i, 0.5, 3.0) for i in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert backoff_delay(0, 0.5, 30.0, retry_after=4.0) == 4.0
    assert backoff_delay(0, 0.5, 3.0, retry_after=100.0) == 3.0


def test_rate_limiter_spaces_requests():
    now = [100.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(4.0, clock=lambda: now[0], sleep=sleep)
    for _ in range(3):
        limiter.wait()
    assert slept == pytest.approx([0.25, 0.25])
    now[0] += 10.0  # idle for a while: no wait needed
    assert limiter.wait() == 0.0
    assert RateLimiter(0, clock=lambda: 0.0, sleep=sleep).wait() == 0.0


def test_cache_key_depends_on_everything():
    base = cache_key("m", "p", "a", "b")
    assert base == cache_key("m", "p", "a", "b")
    assert len({base, cache_key("m2", "p", "a", "b"), cache_key("m", "p2", "a", "b"),
                cache_key("m", "p", "b", "a")}) == 4


def test_chat_completions_url():
    assert chat_completions_url("http://h:1/v1") == "http://h:1/v1/chat/completions"
    assert chat_completions_url("http://h:1/v1/chat/completions/") == "http://h:1/v1/chat/completions"


# --------------------------------------------------------------------------------------------- local server

_REPLY = re.compile(r"<reply_1>\n(.*?)\n</reply_1>.*<reply_2>\n(.*?)\n</reply_2>", re.S)


class _Handler(BaseHTTPRequestHandler):
    """Chat-completions stand-in: scores each reply by its word count (capped at 9), +1 for the reply
    shown first (a position bias), after `fail_next` injected HTTP 500s."""

    def do_POST(self):  # noqa: N802 - http.server API
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        if server.fail_next > 0:
            server.fail_next -= 1
            return self._send(500, {"error": {"message": "injected failure"}})
        if server.status != 200:
            return self._send(server.status, {"error": {"message": "nope"}})
        first, second = _REPLY.search(body["messages"][-1]["content"]).groups()
        s1, s2 = min(9, len(first.split())) + 1, min(9, len(second.split()))
        content = server.reply_override or f"Reply 1 has more detail.\nSCORES: {s1} {s2}"
        return self._send(200, {"id": "x", "object": "chat.completion", "model": body["model"],
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": content}}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def judge_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.requests, server.fail_next, server.status, server.reply_override = [], 0, 200, None
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _client(url: str, cache: Path | None, **kw) -> JudgeClient:
    settings = {"rate_limit": 0.0, "max_retries": 2, "backoff": 0.01, "timeout": 5.0}
    settings.update(kw)
    return JudgeClient(url, "judge-test", cache_path=cache, **settings)


def test_round_trip_with_retry_and_cache(judge_server, tmp_path):
    cache = tmp_path / "cache.jsonl"
    judge_server.fail_next = 1
    client = _client(judge_server.url, cache, api_key="sk-test", send_key_over_http=True)
    verdict = client.judge_pair("\n\nHuman: Name fruits.\n\nAssistant:", " apple, pear, plum, fig.", " apple.")
    # a: 4 words, b: 1 word; the +1 position bias cancels over both orders.
    assert (verdict.score_a, verdict.score_b) == (4.5, 1.5)
    assert verdict.ab == (5.0, 1.0) and verdict.ba == (2.0, 4.0)
    assert verdict.outcome() == "win" and verdict.position_consistent
    assert client.requests_sent == 3  # one injected 500, then the two orders
    assert len(judge_server.requests) == 3
    sent = judge_server.requests[-1]
    assert sent["path"] == "/v1/chat/completions" and sent["auth"] == "Bearer sk-test"
    assert sent["body"]["model"] == "judge-test" and sent["body"]["temperature"] == 0.0
    assert len(cache.read_text().splitlines()) == 2

    again = _client(judge_server.url, cache)
    cached = again.judge_pair("\n\nHuman: Name fruits.\n\nAssistant:", " apple, pear, plum, fig.", " apple.")
    assert again.requests_sent == 0 and len(judge_server.requests) == 3
    assert (cached.score_a, cached.score_b, cached.from_cache) == (4.5, 1.5, 2)


def test_malformed_reply_is_invalid_and_not_cached(judge_server, tmp_path):
    judge_server.reply_override = "Both replies look great to me!"
    cache = tmp_path / "cache.jsonl"
    client = _client(judge_server.url, cache)
    verdict = client.judge_pair("p", "a", "b")
    assert verdict.outcome() == "invalid" and client.requests_sent == 2
    assert not cache.exists() or cache.read_text() == ""


def test_persistent_server_error_is_user_error(judge_server):
    judge_server.fail_next = 10
    client = _client(judge_server.url, None, max_retries=2)
    with pytest.raises(UserError, match="failed after 3 attempt"):
        client.judge_pair("p", "a", "b")
    assert len(judge_server.requests) == 3


def test_auth_error_fails_without_retry(judge_server):
    judge_server.status = 401
    with pytest.raises(UserError, match="HTTP 401.*API key"):
        _client(judge_server.url, None, max_retries=3).judge_pair("p", "a", "b")
    assert len(judge_server.requests) == 1


def test_unreachable_endpoint_is_user_error():
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    client = _client(url, None, max_retries=1, backoff=0.0, timeout=2.0)
    with pytest.raises(UserError, match="unreachable after 2 attempt"):
        client.judge_pair("p", "a", "b")


def test_bad_url_scheme():
    with pytest.raises(UserError, match="http"):
        JudgeClient("127.0.0.1:8000", "m")


# --------------------------------------------------------------------------------------------- CLI


def _write_generations(path: Path, answers: list[str], rewards: list[float]) -> None:
    rows = [{"prompt": f"\n\nHuman: q{i}\n\nAssistant:", "answer": a, "reward": r}
            for i, (a, r) in enumerate(zip(answers, rewards))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_compare_cli_with_judge_and_cache(judge_server, tmp_path, monkeypatch):
    from mpo_ext.eval_cli import compare_command

    a, b = tmp_path / "mpo.jsonl", tmp_path / "ppo.jsonl"
    _write_generations(a, [" one two three", " x", " same"], [1.0, 0.0, 0.5])
    _write_generations(b, [" one", " x y z w", " same"], [0.2, 0.1, 0.5])
    monkeypatch.setenv("MY_JUDGE_KEY", "sk-cli")
    args = [str(a), str(b), "--tie_margin", "0.15", "--judge_url", judge_server.url, "--judge_model", "judge-test",
            "--judge_api_key_env", "MY_JUDGE_KEY", "--judge_send_key_over_http", "--judge_rate_limit", "0",
            "--judge_backoff", "0", "--output_dir", str(tmp_path / "cmp")]
    result = CliRunner().invoke(compare_command, args)
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert (summary["a"], summary["b"]) == ("mpo", "ppo")
    rm = summary["reward_model"]
    assert (rm["win"], rm["tie"], rm["lose"]) == (1, 2, 0)  # diffs 0.8, -0.1 (within 0.15), 0.0
    judge = summary["judge"]
    assert (judge["win"], judge["tie"], judge["lose"], judge["invalid"]) == (1, 1, 1, 0)
    # 3 pairs x 2 orders, but the identical pair's two orders are one request (the second is a cache hit).
    assert judge["requests_sent"] == 5 and len(judge_server.requests) == 5
    assert judge_server.requests[0]["auth"] == "Bearer sk-cli"
    details = [json.loads(x) for x in (tmp_path / "cmp" / "compare_details.jsonl").read_text().splitlines()]
    assert [d["judge_outcome"] for d in details] == ["win", "lose", "tie"]

    rerun = CliRunner().invoke(compare_command, args)
    assert rerun.exit_code == 0, rerun.output
    assert len(judge_server.requests) == 5  # every verdict came from the cache
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["judge"]["requests_sent"] == 0


def test_compare_cli_unreachable_judge_exits_2(tmp_path):
    from mpo_ext.eval_cli import compare_command

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_generations(a, [" x"], [1.0])
    _write_generations(b, [" y"], [0.0])
    result = CliRunner().invoke(compare_command, [
        str(a), str(b), "--judge_url", f"http://127.0.0.1:{free_port()}", "--judge_model", "m",
        "--judge_max_retries", "0", "--judge_rate_limit", "0"])
    assert result.exit_code == 2
    assert "unreachable" in result.output and "Traceback" not in result.output


# --------------------------------------------------------------------------------------------- hostile servers
# Each server below misbehaves in one way a real endpoint (or a man in the middle) can; the client must
# keep the key, stay within its deadline and end with one line.

KEY = "sk-secret-4f9a"


def _ok_reply() -> bytes:
    return json.dumps({"choices": [{"message": {"role": "assistant", "content": "SCORES: 6 3"}}]}).encode()


class _Hostile(BaseHTTPRequestHandler):
    """`server.modes` is consumed one entry per request (the last one repeats): redirect, trickle,
    truncate, bad_status, echo_401 or ok."""

    def do_POST(self):  # noqa: N802 - http.server API
        server = self.server
        self.rfile.read(int(self.headers["Content-Length"]))
        server.requests.append(self.headers.get("Authorization"))
        mode = server.modes.pop(0) if len(server.modes) > 1 else server.modes[0]
        if mode == "redirect":
            self.send_response(302)
            self.send_header("Location", server.location)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif mode == "trickle":  # a valid start, then one byte every 1.5 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            for _ in range(8):
                if server.stopping.wait(1.5):
                    break
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:
                    break
        elif mode == "truncate":  # promises 500 bytes, sends 20 and hangs up
            self.send_response(200)
            self.send_header("Content-Length", "500")
            self.end_headers()
            self.wfile.write(_ok_reply()[:20])
        elif mode == "bad_status":
            self.wfile.write(f"HTTQ/9.9 two-hundred {self.headers.get('Authorization')}\r\n\r\n".encode())
        elif mode == "echo_401":  # echoes the request headers in the reason phrase and the body
            echo = " ".join(f"{k}: {v}" for k, v in self.headers.items())
            body = json.dumps({"error": {"message": f"bad key; you sent {echo}"}}).encode()
            self.send_response(401, f"Unauthorized {self.headers.get('Authorization')}")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif mode == "huge_length":  # announces 1 GiB, then streams it
            self._stream(1 << 30, length=True)
        elif mode == "huge_stream":  # no length: streams until the client hangs up
            self._stream(1 << 30, length=False)
        elif mode == "deep":  # valid JSON nested 200k deep
            self._body(b"[" * 200_000 + b"]" * 200_000)
        else:
            self._body(_ok_reply())
        self.close_connection = True

    def _body(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, total: int, length: bool) -> None:
        self.send_response(200)
        if length:
            self.send_header("Content-Length", str(total))
        self.end_headers()
        block = b'{"choices": [{"message": {"content": "SCORES: 1' + b" " * (1 << 20)
        try:
            while self.server.bytes_sent < total:
                self.wfile.write(block)
                self.server.bytes_sent += len(block)
        except OSError:  # the client hung up: what a capped reader does
            pass

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def hostile():
    servers = []

    def start(*modes: str, location: str = "") -> ThreadingHTTPServer:
        server = ThreadingHTTPServer(("127.0.0.1", 0), _Hostile)
        server.daemon_threads = True
        server.modes, server.location, server.requests, server.bytes_sent = list(modes), location, [], 0
        server.stopping = threading.Event()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        server.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stopping.set()
        server.shutdown()
        server.server_close()


def test_redirect_is_refused_and_key_stays(hostile, tmp_path):
    elsewhere = hostile("ok")
    redirector = hostile("redirect", location=elsewhere.url + "/chat/completions")
    cache = tmp_path / "cache.jsonl"
    with pytest.raises(UserError, match="redirect") as err:
        _client(redirector.url, cache, api_key=KEY, max_retries=3, send_key_over_http=True).judge_pair("p", "a", "b")
    assert elsewhere.requests == []  # neither the key nor the request followed the redirect
    assert redirector.requests == [f"Bearer {KEY}"]  # refused at once: a redirect is not retried
    assert KEY not in str(err.value)
    assert cache.read_text() == ""  # nothing from the other address became a verdict


def test_error_body_and_reason_are_never_shown(hostile, tmp_path):
    from mpo_ext.eval_cli import compare_command

    server = hostile("echo_401")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_generations(a, [" x"], [1.0])
    _write_generations(b, [" y"], [0.0])
    env = {"MY_JUDGE_KEY": KEY}
    result = CliRunner().invoke(compare_command, [
        str(a), str(b), "--judge_url", server.url, "--judge_model", "m", "--judge_api_key_env", "MY_JUDGE_KEY",
        "--judge_send_key_over_http", "--judge_rate_limit", "0", "--output_dir", str(tmp_path / "cmp")], env=env)
    assert result.exit_code == 2, result.output
    assert server.requests == [f"Bearer {KEY}"]  # the server did receive the key, and echoed it back
    assert KEY not in result.output and "you sent" not in result.output
    assert "HTTP 401 Unauthorized" in result.output and "Traceback" not in result.output


def test_trickling_reply_times_out_at_the_total_deadline(hostile, tmp_path):
    from mpo_ext.eval_cli import compare_command

    server = hostile("trickle")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_generations(a, [" x"], [1.0])
    _write_generations(b, [" y"], [0.0])
    result = CliRunner().invoke(compare_command, [
        str(a), str(b), "--judge_url", server.url, "--judge_model", "m", "--judge_timeout", "2",
        "--judge_max_retries", "0", "--judge_rate_limit", "0", "--output_dir", str(tmp_path / "cmp")])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--judge_timeout 2" in errors[0], result.output
    assert len(server.requests) == 1


@pytest.mark.parametrize("mode, needle", [("truncate", "truncated reply"), ("bad_status", "malformed reply")])
def test_broken_replies_are_retried_then_one_line(hostile, mode, needle):
    flaky = hostile(mode, "ok")  # broken once, then fine: the retry gets the verdict
    verdict = _client(flaky.url, None, api_key=KEY, max_retries=2).judge_pair("p", "a", "b")
    assert verdict.ab == (6.0, 3.0) and len(flaky.requests) == 3

    broken = hostile(mode)  # always broken: one line after the retries
    with pytest.raises(UserError, match=f"failed after 3 attempt.*{needle}") as err:
        _client(broken.url, None, api_key=KEY, max_retries=2).judge_pair("p", "a", "b")
    assert len(broken.requests) == 3 and KEY not in str(err.value)


def test_cache_lines_of_the_wrong_shape_are_ignored(hostile, tmp_path, capsys):
    server = hostile("ok")
    cache = tmp_path / "cache.jsonl"
    good_key = cache_key("judge-test", "p", "b", "a")
    cache.write_bytes(b"\n".join([
        json.dumps({"key": cache_key("judge-test", "p", "a", "b"), "scores": "79"}).encode(),  # wrong type
        json.dumps({"key": "k2", "scores": [1]}).encode(),
        json.dumps({"key": "k3", "scores": [float("nan"), 2]}).encode(),
        json.dumps(["key", "scores"]).encode(),
        b"\xff\xfe not utf-8",
        json.dumps({"key": good_key, "scores": [2, 8], "reply": "SCORES: 2 8"}).encode(),
        b'{"key": "torn',
    ]) + b"\n")
    verdict = _client(server.url, cache).judge_pair("p", "a", "b")
    assert verdict.ab == (6.0, 3.0) and verdict.ba == (2.0, 8.0)  # the bad line asked again, the good one reused
    assert len(server.requests) == 1 and verdict.from_cache == 1
    assert "ignored 6 line(s)" in capsys.readouterr().err


def _make_read_only(path: Path) -> None:
    path.chmod(0o444)
    if os.access(path, os.W_OK):  # root ignores modes: make the file immutable instead
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a file read-only for root here (no chattr +i)")


def test_read_only_cache_is_one_line_before_any_request(hostile, tmp_path):
    from mpo_ext.eval_cli import compare_command

    server = hostile("ok")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_generations(a, [" x"], [1.0])
    _write_generations(b, [" y"], [0.0])
    cache = tmp_path / "cache.jsonl"
    cache.write_text("")
    _make_read_only(cache)
    try:
        result = CliRunner().invoke(compare_command, [
            str(a), str(b), "--judge_url", server.url, "--judge_model", "m", "--judge_rate_limit", "0",
            "--judge_cache", str(cache)])
    finally:
        subprocess.run(["chattr", "-i", str(cache)], capture_output=True)
    assert result.exit_code == 2, result.output
    assert "--judge_cache" in result.output and str(cache) in result.output and "Traceback" not in result.output
    assert server.requests == []


# --------------------------------------------------------------------------------------------- hostile replies


PARSE_PROBE = r"""
import sys
from mpo_ext.judge import parse_scores
cases = ["SCORES: 1" + " " * 200_000, "Scores: 7" + " \t" * 100_000 + "x", "score: " + "1" * 200_000 + "x",
         "1" * 200_000, ("7" + " " * 2_000 + "x\n") * 100, "score" + "*" * 200_000, "8 out" + " " * 200_000,
         "SCORES: 7" + " " * 100_000 + "3"]
print([parse_scores(c) for c in cases])
"""


def test_replies_made_to_stall_the_parser_parse_at_once():
    """Quadratic (or worse) regexes took 20 s on 8 KB of spaces after "SCORES: 1"; these 200 KB replies would
    take hours. Run in a child so a regression fails by its generous timeout instead of hanging the suite."""
    from conftest import run_command

    proc = run_command([sys.executable, "-c", PARSE_PROBE], timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[None, None, None, None, None, None, None, (7.0, 3.0)]"


@pytest.mark.parametrize("mode", ["huge_length", "huge_stream"])
def test_huge_reply_is_not_read_whole(hostile, mode):
    server = hostile(mode)
    with pytest.raises(UserError, match="larger than 4 MiB") as err:
        _client(server.url, None, max_retries=3).judge_pair("p", "a", "b")
    assert len(server.requests) == 1  # not retried: the same endpoint would send the same
    assert "Traceback" not in str(err.value)
    # The client stopped reading at the cap and hung up: the server could not push the whole GiB.
    assert server.bytes_sent < (256 << 20), server.bytes_sent


def test_deeply_nested_reply_is_an_unreadable_reply_not_a_traceback(hostile):
    server = hostile("deep")
    with pytest.raises(UserError, match=r"failed after 2 attempt.*unreadable reply \(RecursionError\)"):
        _client(server.url, None, max_retries=1).judge_pair("p", "a", "b")


def test_api_key_goes_over_plain_http_only_when_asked(hostile, capsys):
    server = hostile("ok")
    _client(server.url, None, api_key=KEY).judge_pair("p", "a", "b")
    assert server.requests == [None, None]  # no Authorization header over http
    err = capsys.readouterr().err
    assert "plain http, so the API key is not sent" in err and "--judge_send_key_over_http" in err and KEY not in err
    _client(server.url, None, api_key=KEY, send_key_over_http=True).judge_pair("p", "x", "y")
    assert server.requests[2:] == [f"Bearer {KEY}"] * 2


def test_key_withheld_over_http_is_named_in_the_401_line(hostile, tmp_path):
    server = hostile("echo_401")
    with pytest.raises(UserError, match="not sent over plain http"):
        _client(server.url, None, api_key=KEY).judge_pair("p", "a", "b")
    assert server.requests == [None]

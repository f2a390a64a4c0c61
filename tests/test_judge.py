"""LLM judge: reply parsing, order folding, retry/backoff, rate limit, cache, and a round trip through a
local OpenAI-compatible server (http.server on 127.0.0.1, stopped after each test)."""

from __future__ import annotations

import json
import re
import socket
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
    client = _client(judge_server.url, cache, api_key="sk-test")
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
            "--judge_api_key_env", "MY_JUDGE_KEY", "--judge_rate_limit", "0", "--judge_backoff", "0",
            "--output_dir", str(tmp_path / "cmp")]
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

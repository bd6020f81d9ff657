"""tcserve in front of real OpenAI-compatible servers, driven with anthropic==0.125.0.

The upstreams are llama-cpp-python's own OpenAI server (`python -m
llama_cpp.server`) on the embedded Gemma model, two of them, started here on
127.0.0.1 and killed, stopped (SIGSTOP) or restarted by the fault tests. That
server drops a matched stop's text without naming it, so the model table sends
it no stops (`stop_limit = 0`): every stop here is one the upstream does not
know about, and tcserve's own matcher must find, cut and report it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from support import free_port, serve_app, settings
from tcserve.api.app import create_app
from tcserve.config import UpstreamModel
from tcserve.engines.llamacpp.engine import default_model_path

pytestmark = pytest.mark.model

PROMPT = f"{anthropic.HUMAN_PROMPT} What is the capital of France?{anthropic.AI_PROMPT}"
COUNTING = f"{anthropic.HUMAN_PROMPT} List the numbers from 1 to 1000, one per line.{anthropic.AI_PROMPT} 1\n2\n3\n"
UPSTREAM_CONTEXT = 1024


class Upstream:
    """One `python -m llama_cpp.server` process on a fixed port (so it can be restarted)."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log_dir / f"upstream-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(default_model_path()),
                   "--model_alias", "gemma", "--host", "127.0.0.1", "--port", str(self.port),
                   "--n_ctx", str(UPSTREAM_CONTEXT), "--n_threads", "1", "--n_threads_batch", "1",
                   "--interrupt_requests", "False", "--logits_all", "False", "--verbose", "False"]  # fmt: skip
        with self._log.open("ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=log, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self._log.read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.1)
        raise AssertionError("upstream did not start")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGCONT)
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def pause(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def upstreams(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Upstream]]:
    log_dir = tmp_path_factory.mktemp("upstream-logs")
    pair = [Upstream(log_dir), Upstream(log_dir)]
    try:
        for upstream in pair:
            upstream.start()
        yield pair
    finally:
        for upstream in pair:
            upstream.kill()


def _tcserve(upstreams: list[Upstream], **overrides: Any) -> tuple[Any, Any]:
    model = UpstreamModel.model_validate({
        "name": "upstream-gemma", "engine": "upstream", "urls": [u.url for u in upstreams],
        "upstream_model": "gemma", "context_size": UPSTREAM_CONTEXT, "health_interval": 0.2,
        "read_timeout": 30, "stop_limit": 0, **overrides,
    })  # fmt: skip
    return create_app(settings(), [model]), model


def _revive(upstreams: list[Upstream]) -> None:
    for upstream in upstreams:
        if upstream.process is None or upstream.process.poll() is not None:
            upstream.start()  # a fault test killed it
        upstream.resume()


@pytest.fixture
def tcserve(upstreams: list[Upstream]) -> Iterator[tuple[anthropic.Anthropic, Any]]:
    _revive(upstreams)
    app, _ = _tcserve(upstreams)
    with serve_app(app) as url:
        _wait_replicas_up(app, len(upstreams))
        with anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as client:
            yield client, app


def _engine(app: Any) -> Any:
    return app.state.tcserve.engines.by_name["upstream-gemma"]


def _wait_replicas_up(app: Any, count: int) -> None:
    for _ in range(600):
        if sum(up for up, _ in _engine(app).replicas().values()) == count:
            return
        time.sleep(0.05)
    raise AssertionError(f"replicas not up: {_engine(app).replicas()}")


def greedy(client: anthropic.Anthropic, **overrides: Any) -> Any:
    params = {"model": "upstream-gemma", "prompt": PROMPT, "max_tokens_to_sample": 40, "temperature": 0, **overrides}
    return client.completions.create(**params)


def test_create_and_stream_agree(tcserve: tuple[anthropic.Anthropic, Any]) -> None:
    client, _ = tcserve
    whole = greedy(client)
    assert whole.model == "upstream-gemma" and whole.completion.strip()
    assert whole.stop_reason in ("stop_sequence", "max_tokens")
    events = list(greedy(client, stream=True))
    assert "".join(e.completion for e in events) == whole.completion
    assert events[-1].stop_reason == whole.stop_reason and events[-1].stop == whole.stop


def test_the_builtin_stop_is_reported_like_the_embedded_engine(tcserve: tuple[anthropic.Anthropic, Any]) -> None:
    client, _ = tcserve
    completion = greedy(client, max_tokens_to_sample=80)
    assert completion.stop_reason == "stop_sequence" and completion.stop == "\n\nHuman:"
    assert "Human:" not in completion.completion


def test_stop_sequences_the_upstream_does_not_know_about(tcserve: tuple[anthropic.Anthropic, Any]) -> None:
    client, _ = tcserve
    counted = greedy(client, prompt=COUNTING, max_tokens_to_sample=60)
    assert "\n9\n" in counted.completion
    stopped = greedy(client, prompt=COUNTING, max_tokens_to_sample=60, stop_sequences=["\n9\n"])
    streamed = list(greedy(client, prompt=COUNTING, max_tokens_to_sample=60, stop_sequences=["\n9\n"], stream=True))
    assert stopped.stop == "\n9\n" and stopped.stop_reason == "stop_sequence"
    assert stopped.completion == counted.completion[: counted.completion.index("\n9\n")]
    assert "".join(e.completion for e in streamed) == stopped.completion


def test_max_tokens(tcserve: tuple[anthropic.Anthropic, Any]) -> None:
    client, _ = tcserve
    completion = greedy(client, prompt=COUNTING, max_tokens_to_sample=5)
    assert completion.stop_reason == "max_tokens" and completion.stop is None


@pytest.mark.parametrize("stream", [False, True])
def test_context_overflow_is_a_400_before_anything_is_sent(
    tcserve: tuple[anthropic.Anthropic, Any], stream: bool
) -> None:
    client, _ = tcserve
    with pytest.raises(anthropic.BadRequestError) as budget:
        greedy(client, max_tokens_to_sample=UPSTREAM_CONTEXT, stream=stream)
    assert f"max_tokens_to_sample > {UPSTREAM_CONTEXT} context" in budget.value.message
    # Counted with the upstream's own tokenizer (llama-cpp-python's /extras/tokenize).
    with pytest.raises(anthropic.BadRequestError) as prompt:
        greedy(client, prompt=PROMPT.replace("France?", "France? " + "word " * 1500), stream=stream)
    assert "prompt is too long: 15" in prompt.value.message


def test_a_killed_replica_ends_its_stream_with_an_error_and_the_other_takes_over(
    upstreams: list[Upstream], tcserve: tuple[anthropic.Anthropic, Any]
) -> None:
    client, app = tcserve
    with ExitStack() as stack:
        stream = stack.enter_context(greedy(client, prompt=COUNTING, max_tokens_to_sample=500, stream=True))
        events = iter(stream)
        assert next(events).completion is not None
        busy = next(url for url, (_, in_flight) in _engine(app).replicas().items() if in_flight)
        victim = next(u for u in upstreams if u.url == busy)
        victim.kill()
        with pytest.raises(anthropic.APIStatusError) as cut:
            for _ in events:
                pass
    assert cut.value.body["error"]["type"] in ("api_error", "overloaded_error")  # an SSE error event
    for _ in range(3):
        assert greedy(client).completion.strip()  # served by the survivor
    assert _engine(app).replicas()[busy][0] is False


def test_a_stuck_replica_gets_no_new_work_and_its_silent_stream_ends_with_an_error(
    upstreams: list[Upstream], caplog: pytest.LogCaptureFixture
) -> None:
    _revive(upstreams)
    # read_timeout is an hour: only the health check can end the stuck stream in time (after
    # STALL_CHECKS timed-out checks). connect_timeout leaves the busy healthy replica time to answer.
    app, _ = _tcserve(upstreams, read_timeout=3600, connect_timeout=3)
    with serve_app(app) as url, ExitStack() as stack:
        _wait_replicas_up(app, 2)
        # A request sent to the stuck replica would wait an hour: fail in 2 minutes instead.
        client = stack.enter_context(anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=120))
        stream = stack.enter_context(greedy(client, prompt=COUNTING, max_tokens_to_sample=500, stream=True))
        events = iter(stream)
        assert next(events).completion is not None
        busy = next(url for url, (_, in_flight) in _engine(app).replicas().items() if in_flight)
        stuck = next(u for u in upstreams if u.url == busy)
        stuck.pause()  # it answers nothing at all now, but keeps its connections open
        stack.callback(stuck.resume)
        # While its stream is held (more in flight there), and after that stream was ended
        # (then none is): both times, the next request must go to the other replica only.
        assert greedy(client, max_tokens_to_sample=8).completion.strip()
        with pytest.raises(anthropic.APIStatusError) as cut:
            for _ in events:
                pass
        for _ in range(2):
            assert greedy(client, max_tokens_to_sample=8).completion.strip()
    assert cut.value.body["error"]["type"] == "api_error"  # an SSE error event, not a silent end
    assert f"replica {busy} is down and its stream has been silent" in caplog.text
    assert f"{busy} broke before any text" not in caplog.text  # no new request went there and was retried
    assert f"replica {busy} failed" not in caplog.text


def test_every_replica_down_is_529_with_retry_after(upstreams: list[Upstream]) -> None:
    _revive(upstreams)
    app, _ = _tcserve(upstreams)
    with serve_app(app) as url, anthropic.Anthropic(base_url=url, api_key="none", max_retries=0) as client:
        _wait_replicas_up(app, 2)
        for upstream in upstreams:
            upstream.kill()
        with pytest.raises(anthropic.OverloadedError) as caught:
            greedy(client, stream=True)
        assert float(caught.value.response.headers["retry-after"]) >= 1

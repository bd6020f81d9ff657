"""An engine that forwards to upstream servers: OpenAI-compatible `/v1/completions`
(the transcript as text) or `/v1/chat/completions` (as turns, `chat.py`), or
Anthropic's Messages API (`messages.py`).

tcserve keeps the wire (validation, prompt rules, stop semantics, errors, SSE);
the upstream (vLLM, SGLang, llama-server, TGI, Anthropic; one or many replicas)
does the compute. Each request goes to the replica with the fewest requests in
flight. Replicas are health-checked in the background and skipped while down:
`/health`, or `/v1/models` where that is 404 (llama-cpp-python's server, and
Anthropic's API, whose /v1/models costs no tokens and checks the key too).

Failure rules:
- before any text was produced, a failed replica (unreachable, 5xx, 429, a
  stream that broke) is tried once more on another replica;
- an upstream 429, 503 or 529, or no reachable replica, is `Overloaded` (529 with
  the upstream's `retry-after`, which the SDKs honour);
- an upstream 400 is the caller's mistake and keeps its message; a Messages
  upstream's 404 (a model id it does not serve, or has retired) is our 404 with
  its message; a 401/403 is tcserve's key, not the caller's: a 500, logged;
- a Messages stream's `error` event becomes ours (an overloaded one is
  `Overloaded`), and a stop reason a completion cannot express is a 400;
- a timeout is an `EngineFailure` (500 `api_error`): the SDKs retry a 500, and
  Anthropic's error vocabulary (docs/wire.md) has no timeout type;
- after text was produced, any failure ends the stream with an error, never a
  silent truncation;
- a replica that is clearly down ends its streams that have been silent for
  longer than `health_interval` (retried elsewhere when no text came yet), and
  the requests still waiting for its answer (a token count, a stream's headers),
  so a dead replica that keeps its connections open does not leave clients
  waiting for `read_timeout`. Clearly down: its health check got an error
  status or a refused/reset connection, or timed out `STALL_CHECKS` times in a
  row (one timeout alone is ambiguous: llama-cpp-python's /v1/models waits for
  a long prompt to finish). A replica that is down gets no new requests, not
  even a token count.

Stops: the built-in and the user's stop sequences go upstream (up to
`stop_limit`) with `include_stop_str_in_output`, so the stop text reaches
tcserve's own stop matcher, which cuts and reports it exactly as it does for
the embedded engine, and enforces the stops the upstream was not sent. vLLM
also names the stop it matched (`stop_reason`). An upstream that does neither
(llama-cpp-python's server drops the stop text silently) needs `stop_limit = 0`:
then tcserve alone finds the stops and closes the upstream stream at the match.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import httpx

from tcserve.core.request import EngineEvent, Finished, GenerationRequest, PromptTokens, TextDelta
from tcserve.core.transcript import Conversation, Turn
from tcserve.engines.base import Admission, EngineStats, EngineStream, PromptFormat
from tcserve.engines.upstream.chat import (
    ChatStream,
    ChatStreamError,
    chat_body,
    chat_messages,
    openai_finish,
    openai_options,
)
from tcserve.engines.upstream.messages import MessagesStream, messages_body, messages_headers, upstream_error
from tcserve.errors import EngineFailure, EngineNotReady, InvalidRequest, ModelNotFound, Overloaded, TCServeError

log = logging.getLogger("tcserve.upstream")

Api = Literal["completions", "chat", "messages"]
PATHS: dict[Api, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions", "messages": "/v1/messages"}
PROBE = GenerationRequest(
    "probe", "\n\nHuman: Hi\n\nAssistant:", 1, conversation=Conversation("", (Turn("human", "Hi"),), "")
)
"""What `start` counts to find out whether the upstream can count prompts."""
OVERLOADED_STATUSES = frozenset({429, 503, 529})
TOKENIZE_ROUTES = (("/tokenize", "prompt"), ("/extras/tokenize", "input"))
"""(path, field of the text): vLLM and SGLang, then llama-cpp-python's server."""
ATTEMPTS = 2
"""The first replica, then one retry on another."""
STALL_CHECKS = 3
"""Health checks in a row that must time out before a replica's silent streams are ended."""
T = TypeVar("T")


@dataclass(eq=False)
class Replica:
    url: str
    up: bool = False
    answering: set[httpx.Response] = field(default_factory=set)
    """Its open streams: counted from their 200 until tcserve is done with them (httpx
    closes a response itself once its body is read, so `is_closed` cannot tell)."""
    timeouts: int = 0
    """Health checks in a row that timed out."""
    streams: set[_Pump | _Call[Any]] = field(default_factory=set)
    """What waits on this replica: open streams, and requests still waiting for an answer."""


class _Retryable(Exception):
    """This replica failed before any text; another may succeed."""

    def __init__(self, reason: str, *, overloaded: bool = False, retry_after: float = 1.0) -> None:
        super().__init__(reason)
        self.overloaded = overloaded
        self.retry_after = retry_after


class _Pump:
    """Reads one upstream stream's lines in a task of its own, so that the health
    check can end a stream whose replica went down and silent."""

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self._lines: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._aborted = False
        self.last_read = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def next_line(self) -> str | None:
        """The next line, None at the end of the stream; raises what ended it otherwise."""
        item = await self._lines.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self, reason: str) -> None:
        """End the stream: the reader gets what was read so far, then `_Retryable(reason)`."""
        if not self._aborted:
            self._aborted = True
            self._lines.put_nowait(_Retryable(reason))
            self._task.cancel()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        try:
            async for line in self._response.aiter_lines():
                self.last_read = time.monotonic()
                self._lines.put_nowait(line)
        except Exception as error:  # a transport error or a timeout: the reader raises it
            self._lines.put_nowait(error)
        else:
            self._lines.put_nowait(None)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """What `engines/factory.py` fills from a model's config (the defaults live there)."""

    model: str
    """The model name the upstream serves; `{model}` in it is the id the caller asked for."""
    urls: tuple[str, ...]
    """Replicas, e.g. http://gpu-1:8000."""
    api_key: str | None = field(repr=False)
    """Sent as `Authorization: Bearer` (`x-api-key` to a Messages upstream); never logged."""
    context_size: int | None
    """None: the upstream's max_model_len from its /v1/models."""
    connect_timeout: float
    read_timeout: float
    health_interval: float
    stop_limit: int
    """Stop sequences sent upstream (tcserve enforces all of them)."""
    max_in_flight: int
    api: Api = "completions"


class _Call(Generic[T]):
    """One request to a replica that is waiting for its answer (a stream's headers, a
    token count), in a task of its own, so that the health check can end it like a
    silent stream: a replica that stopped answering after it was picked would
    otherwise hold it for `read_timeout`."""

    def __init__(self, call: Awaitable[T]) -> None:
        self.last_read = time.monotonic()
        self._task = asyncio.ensure_future(call)
        self._reason: str | None = None

    def abort(self, reason: str) -> None:
        """End the call: the caller gets `_Retryable(reason)`."""
        if self._reason is None:
            self._reason = reason
            self._task.cancel()

    async def result(self) -> T:
        try:
            return await self._task  # the caller's own cancellation cancels the task too
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if self._reason is None or (current is not None and current.cancelling()):
                raise
            raise _Retryable(self._reason) from None


class UpstreamEngine:
    def __init__(self, settings: UpstreamSettings, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._config = settings
        self._name = settings.model
        self._replicas = [Replica(url.rstrip("/")) for url in settings.urls]
        self._context_size = settings.context_size
        self._admission = Admission(settings.max_in_flight, 0, retry_after=1.0)
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._health: asyncio.Task[None] | None = None
        self._generated = 0
        self._tokenize_route = 0
        self._counts_tokens: bool | None = None
        """Whether a tokenize route answered; None until one request found out."""
        self._on_vllm = False
        """A Messages upstream that is vLLM, found out at start: it gets prefills by its
        chat route (`_api_for`), and its prompts are counted like a chat upstream's."""

    # -- the Engine protocol ------------------------------------------------------------

    @property
    def context_size(self) -> int:
        return self._context_size or 0

    @property
    def ready(self) -> bool:
        return self._client is not None and self._context_size is not None

    @property
    def prompt_format(self) -> PromptFormat:
        return "raw" if self._config.api == "completions" else "chat"

    async def start(self) -> None:
        headers: dict[str, str] = {}
        if self._config.api == "messages":
            headers.update(messages_headers(self._config.api_key or ""))
            if self._config.api_key is None:
                del headers["x-api-key"]  # a local server (vLLM) that needs no key
        elif self._config.api_key is not None:
            headers["authorization"] = f"Bearer {self._config.api_key}"
        timeout = httpx.Timeout(self._config.read_timeout, connect=self._config.connect_timeout)
        # Admission (max_in_flight) bounds the streams, and the upstream batches them. httpx's
        # default pool holds 100 connections: a stream past 100 in flight waited for one and
        # failed with a PoolTimeout after connect_timeout. It also keeps only 20 idle ones.
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=self._config.max_in_flight)
        client = httpx.AsyncClient(headers=headers, timeout=timeout, transport=self._transport, limits=limits)
        if self._context_size is not None:  # known: still find out which replicas are up before serving
            await self._check_replicas(client)
        while self._context_size is None:  # /health says "loading" until a replica tells us
            await self._check_replicas(client)
            self._context_size = await self._discover_context(client)
            if self._context_size is None:
                await asyncio.sleep(self._config.health_interval)
        if self._config.api == "messages":
            self._on_vllm = await self._serves_vllm(client)
        self._client = client
        self._health = asyncio.create_task(self._health_loop())
        log.info("upstream %s (%s API): %d replica(s), context %d", self._name, self._config.api,
                 len(self._replicas), self._context_size)  # fmt: skip
        await self.tokenize(PROBE)  # find out now whether prompts can be counted (warnings() says)

    async def tokenize(self, request: GenerationRequest) -> PromptTokens:
        """The prompt's tokens by the upstream's own tokenizer: vLLM's and SGLang's
        `/tokenize` (for a chat upstream, with the messages, which vLLM renders with
        the model's template), or llama-cpp-python's `/extras/tokenize`. An upstream
        with neither cannot be counted (count None, and `warnings` says so): its own
        length check and its usage figures stand in for ours; so is Anthropic's
        Messages API (its count_tokens route is an API call of its own). vLLM's
        Messages server is counted with its /tokenize, as a chat upstream: its
        /v1/messages renders the same messages with the same template (its own
        count_tokens route would count a prefill as /v1/messages renders it, which is
        not how tcserve sends one there: see `_api_for`). Only replicas that are up are
        asked: a stuck one would hold the request for `read_timeout` before it is even
        sent."""
        client = self._require_client()
        if self._config.api == "messages" and not self._on_vllm:
            self._counts_tokens = False
            return PromptTokens(None)
        routes = TOKENIZE_ROUTES[:1] if self._config.api != "completions" else TOKENIZE_ROUTES
        while self._tokenize_route < len(routes):
            path, field = routes[self._tokenize_route]
            payload = self._tokenize_payload(request, field)
            for replica in [r for r in self._by_load() if r.up]:
                try:
                    response = await self._call(replica, client.post(f"{replica.url}{path}", json=payload))
                except (httpx.HTTPError, _Retryable):
                    continue
                if response.status_code == 200:
                    return self._counted(response.json())
                break
            else:
                return PromptTokens(None)  # no replica answered: let the request itself fail or succeed
            if response.status_code not in (404, 405):
                return PromptTokens(None)
            self._tokenize_route += 1  # this kind of server has no such route; try the next kind
        self._counts_tokens = False
        return PromptTokens(None)

    def _counted(self, body: Any) -> PromptTokens:
        """A tokenize route's answer. Every prompt has tokens: a count of 0 (or no count)
        means the route did not read our field (llama-server's /tokenize reads `content`),
        and a silent 0 would turn the context check and input limits off."""
        tokens = body.get("tokens") if isinstance(body, dict) else None
        count = body.get("count", len(tokens) if isinstance(tokens, list) else 0) if isinstance(body, dict) else 0
        if not isinstance(count, int) or count <= 0:
            self._counts_tokens = False
            return PromptTokens(None)
        self._counts_tokens = True
        return PromptTokens(count)

    def _tokenize_payload(self, request: GenerationRequest, field: str) -> dict[str, Any]:
        model = self._model_for(request)
        if self._config.api == "completions" or request.conversation is None:
            return {"model": model, field: request.prompt}
        continues = bool(request.conversation.chat_turns()[1])
        return {"model": model, "messages": chat_messages(request.conversation),
                "add_generation_prompt": not continues, "continue_final_message": continues}  # fmt: skip

    def _model_for(self, request: GenerationRequest) -> str:
        """The upstream's model name: `{model}` stands for the id the caller asked for."""
        return self._name.replace("{model}", request.model_id) if "{model}" in self._name else self._name

    def warnings(self) -> list[str]:
        if self._counts_tokens is False and self._config.api == "messages":
            return [
                "a Messages upstream has no tokenize route: prompts are not counted before they are sent, so the "
                "context check is the upstream's and input-token limits are charged from its usage figures"
            ]
        if self._counts_tokens is False:
            return [
                "the upstream cannot count prompts (no /tokenize or /extras/tokenize answered with a count): "
                "prompts are not counted "
                "before they are sent, so the context check is the upstream's and input-token limits are "
                "charged from its usage figures after the request"
            ]
        return []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        self._require_client()
        self._admission.admit()
        try:
            replica, response = await self._open(request, tried=set())
        except BaseException:
            self._admission.release()
            raise

        async def release() -> None:
            await self._finish(replica, response)
            self._admission.release()

        return EngineStream(self._events(request, replica, response), if_never_started=release)

    def stats(self) -> EngineStats:
        running = sum(len(replica.answering) for replica in self._replicas)
        return EngineStats(waiting=0, running=running, generated_tokens=self._generated)

    def replicas(self) -> dict[str, tuple[bool, int]]:
        """Each replica's (up, requests in flight), for logs and tests."""
        return {replica.url: (replica.up, len(replica.answering)) for replica in self._replicas}

    async def aclose(self) -> None:
        if self._health is not None:
            self._health.cancel()
            await asyncio.gather(self._health, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
        self._client = None

    # -- requests -------------------------------------------------------------------------

    async def _open(self, request: GenerationRequest, tried: set[str]) -> tuple[Replica, httpx.Response]:
        """Send the request to the least busy replica not tried yet; retry once elsewhere."""
        last: _Retryable | None = None
        while len(tried) < ATTEMPTS:
            replica = self._pick(tried)
            if replica is None:
                break
            tried.add(replica.url)
            try:
                return replica, await self._send(replica, request)
            except _Retryable as error:
                log.warning("request %s: replica %s failed: %s", request.request_id, replica.url, error)
                last = error
        if last is not None and not last.overloaded:
            raise EngineFailure(f"upstream failed: {last}")
        retry_after = last.retry_after if last is not None else self._config.health_interval
        raise Overloaded("Overloaded: no upstream replica can take the request", retry_after=retry_after)

    async def _send(self, replica: Replica, request: GenerationRequest) -> httpx.Response:
        client = self._require_client()
        url = f"{replica.url}{PATHS[self._api_for(request)]}"
        http_request = client.build_request("POST", url, json=self._body(request))
        try:
            response = await self._call(replica, client.send(http_request, stream=True))
        except httpx.TimeoutException as error:
            raise _Retryable(f"timed out connecting: {error!r}") from None
        except httpx.TransportError as error:
            replica.up = False  # the health loop brings it back
            raise _Retryable(f"unreachable: {error!r}", overloaded=True) from None
        if response.status_code == 200:
            replica.answering.add(response)
            return response
        detail = (await response.aread()).decode("utf-8", errors="replace")
        await response.aclose()
        status = response.status_code
        if status in OVERLOADED_STATUSES:
            retry_after = _retry_after(response) or 1.0
            raise _Retryable(f"{status} {detail[:200]}", overloaded=True, retry_after=retry_after)
        if status in (401, 403):  # tcserve's own key to the upstream: not the caller's doing
            raise EngineFailure(f"upstream {replica.url} refused tcserve's key: {status} {_error_message(detail)}")
        if status == 404 and self._config.api == "messages":
            raise ModelNotFound(request.model_id, _error_message(detail))
        if 400 <= status < 500 and self._config.api == "messages":
            raise upstream_error(_error_body(detail), status=status)  # the message as Anthropic wrote it
        if 400 <= status < 500:
            raise InvalidRequest(f"upstream rejected the request: {_error_message(detail)}")
        raise _Retryable(f"{status} {detail[:200]}")

    def _api_for(self, request: GenerationRequest) -> Api:
        """The API this request is sent to. vLLM's /v1/messages answers a final assistant
        message instead of continuing it (it renders the template with
        `add_generation_prompt` and has no `continue_final_message`), so on vLLM a prompt
        with a prefill goes to the same replica's /v1/chat/completions, which continues it."""
        conversation = request.conversation
        if self._on_vllm and conversation is not None and conversation.chat_turns()[1]:
            return "chat"
        return self._config.api

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        stops = request.stop_sequences[: self._config.stop_limit]
        conversation = request.conversation
        api = self._api_for(request)
        if api != "completions" and conversation is None:
            raise InvalidRequest("this model needs a Human/Assistant transcript")  # the config forbids it
        if api == "chat" and conversation is not None:
            return chat_body(self._model_for(request), conversation, max_tokens=request.max_tokens,
                             sampling=request.sampling, stop_sequences=stops)  # fmt: skip
        if api == "messages" and conversation is not None:
            return messages_body(self._model_for(request), conversation, max_tokens=request.max_tokens,
                                 sampling=request.sampling, stop_sequences=stops, user_id=request.user_id)  # fmt: skip
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self._model_for(request),
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "temperature": 0.0 if sampling.greedy else sampling.temperature,
            "stream": True,
        }
        body.update(openai_options(sampling, stops))
        body["stream_options"] = {"include_usage": True}  # the usage figures, in a last chunk
        return body

    async def _events(
        self, request: GenerationRequest, replica: Replica, response: httpx.Response
    ) -> AsyncGenerator[EngineEvent, None]:
        produced = 0
        tried = {replica.url}
        try:
            while True:
                try:
                    async with contextlib.aclosing(self._read(request, replica, response)) as events:
                        async for event in events:
                            if isinstance(event, TextDelta) and event.text:
                                produced += 1
                                self._generated += 1
                            yield event
                            if isinstance(event, Finished):
                                return
                    raise _Retryable("the stream ended without a finish reason")
                except (_Retryable, httpx.TransportError) as error:
                    if produced or len(tried) >= ATTEMPTS:
                        raise EngineFailure(f"upstream stream from {replica.url} broke: {error!r}") from None
                    log.warning("request %s: %s broke before any text (%r); retrying", request.request_id,
                                replica.url, error)  # fmt: skip
                    await self._finish(replica, response)
                    replica, response = await self._open(request, tried)
        except httpx.TimeoutException as error:
            raise EngineFailure(f"upstream {replica.url} timed out: {error!r}") from None
        finally:
            await self._finish(replica, response)
            self._admission.release()

    def _read(
        self, request: GenerationRequest, replica: Replica, response: httpx.Response
    ) -> AsyncGenerator[EngineEvent, None]:
        api = self._api_for(request)
        if api == "completions":
            return self._read_completions(replica, response)
        return self._read_turns(replica, response, ChatStream() if api == "chat" else MessagesStream())

    async def _read_turns(
        self, replica: Replica, response: httpx.Response, parser: ChatStream | MessagesStream
    ) -> AsyncGenerator[EngineEvent, None]:
        """A chat or Messages stream -> engine events (the parser ends with `Finished`).
        The parsers' stream errors are retryable before any text (another replica may
        do better); what they map to our own errors (an overloaded event, a stop
        reason a completion cannot express) is passed on as it is."""
        pump = _Pump(response)
        replica.streams.add(pump)
        data: list[str] = []
        try:
            while True:
                line = await pump.next_line()
                if line is not None and line.startswith("data:"):
                    data.append(line[5:].removeprefix(" "))
                    continue
                if data and (line is None or not line.strip()):
                    payload, data = "\n".join(data), []
                    for event in _parsed(parser.feed, payload):
                        yield event
                        if isinstance(event, Finished):
                            return
                if line is None:
                    break
            for event in _parsed(lambda _: parser.close(), ""):
                yield event
        finally:
            replica.streams.discard(pump)
            await pump.close()

    async def _read_completions(self, replica: Replica, response: httpx.Response) -> AsyncGenerator[EngineEvent, None]:
        """OpenAI-style SSE chunks -> engine events. The finish is held until the stream
        ends ([DONE]), so that the usage chunk that follows it (`include_usage`) can
        give its figures; a stream without them is counted by its text chunks."""
        pump = _Pump(response)
        replica.streams.add(pump)
        finished: Finished | None = None
        try:
            while (line := await pump.next_line()) is not None:
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise _Retryable(f"upstream error event: {chunk['error']}")
                for choice in chunk.get("choices") or ():
                    if finished is None and (text := choice.get("text")):
                        yield TextDelta(text)
                    finished = finished or _finished(choice)
                if finished is not None and isinstance(usage := chunk.get("usage"), dict):
                    finished = dataclasses.replace(
                        finished,
                        prompt_tokens=_count(usage.get("prompt_tokens")),
                        completion_tokens=_count(usage.get("completion_tokens")),
                    )
            if finished is not None:
                yield finished
        finally:
            replica.streams.discard(pump)
            await pump.close()

    async def _call(self, replica: Replica, call: Awaitable[T]) -> T:
        """`call`'s answer, or `_Retryable` if the health check ends it (see `_Call`)."""
        pending = _Call(call)
        replica.streams.add(pending)
        try:
            return await pending.result()
        finally:
            replica.streams.discard(pending)

    async def _finish(self, replica: Replica, response: httpx.Response) -> None:
        replica.answering.discard(response)
        await response.aclose()  # closing the connection aborts the upstream request (once)

    # -- replicas -------------------------------------------------------------------------

    def _pick(self, tried: set[str]) -> Replica | None:
        candidates = [r for r in self._by_load() if r.url not in tried]
        return next((r for r in candidates if r.up), None)

    def _by_load(self) -> list[Replica]:
        return sorted(self._replicas, key=lambda replica: len(replica.answering))

    async def _health_loop(self) -> None:
        client = self._require_client()
        while True:
            await asyncio.sleep(self._config.health_interval)
            await self._check_replicas(client)

    async def _check_replicas(self, client: httpx.AsyncClient) -> None:
        await asyncio.gather(*(self._check(client, replica) for replica in self._replicas))

    async def _check(self, client: httpx.AsyncClient, replica: Replica) -> None:
        """vLLM, SGLang, TGI and llama-server answer /health; servers without it
        (llama-cpp-python's) are up when /v1/models answers."""
        timeout = self._config.connect_timeout
        timed_out = False
        try:
            response = await client.get(f"{replica.url}/health", timeout=timeout)
            if response.status_code == 404:
                response = await client.get(f"{replica.url}/v1/models", timeout=timeout)
            up = response.status_code == 200
        except httpx.TimeoutException:
            up, timed_out = False, True
        except httpx.HTTPError:
            up = False
        if up != replica.up:
            log.warning("upstream replica %s is %s", replica.url, "up" if up else "down")
        replica.up = up
        replica.timeouts = replica.timeouts + 1 if timed_out else 0
        if not up and (not timed_out or replica.timeouts >= STALL_CHECKS):
            self._end_silent_streams(replica)

    def _end_silent_streams(self, replica: Replica) -> None:
        """A down replica's streams (and requests waiting for an answer) that have said
        nothing for a health interval are not coming back: end them now rather than
        after `read_timeout`."""
        now = time.monotonic()
        for pump in replica.streams:
            silent = now - pump.last_read
            if silent > self._config.health_interval:
                pump.abort(f"replica {replica.url} is down and its stream has been silent for {silent:.1f} s")

    async def _serves_vllm(self, client: httpx.AsyncClient) -> bool:
        """Whether the upstream is vLLM: its /v1/models cards say `owned_by: "vllm"`
        (Anthropic's say `type: "model"`). The first replica that answers decides."""
        for replica in self._replicas:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
                response = await client.get(f"{replica.url}/v1/models")
                if response.status_code == 200:
                    return any(card.get("owned_by") == "vllm" for card in response.json()["data"])
        return False

    async def _discover_context(self, client: httpx.AsyncClient) -> int | None:
        for replica in self._replicas:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
                response = await client.get(f"{replica.url}/v1/models")
                for card in response.json()["data"]:
                    if card.get("id") == self._name and card.get("max_model_len"):
                        return int(card["max_model_len"])
        if any(replica.up for replica in self._replicas):
            log.error("upstream %s reports no max_model_len for %r: set context_size in the config",
                      self._name, self._name)  # fmt: skip
        return None

    def _require_client(self) -> httpx.AsyncClient:
        if self._client is None:
            raise EngineNotReady()
        return self._client


def _finished(choice: dict[str, Any]) -> Finished | None:
    """The end of a normal completion, or None mid-stream. Any other ending ("abort",
    "error", ...) is a failure: passing it on as a short completion would be a silent
    truncation."""
    reason = choice.get("finish_reason")
    if reason is None:
        return None
    try:
        return openai_finish(reason, choice.get("stop_reason"))  # vLLM names the stop it matched
    except ChatStreamError as error:
        raise _Retryable(str(error)) from None


def _parsed(feed: Callable[[str], list[EngineEvent]], payload: str) -> list[EngineEvent]:
    """A parser's events; its stream errors (EngineFailure) become retryable."""
    try:
        return feed(payload)
    except TCServeError as error:
        if isinstance(error, EngineFailure):
            raise _Retryable(str(error)) from None
        raise
    except ValueError as error:  # not JSON
        raise _Retryable(f"the upstream sent an unreadable event: {error}") from None


def _error_body(detail: str) -> dict[str, Any]:
    """An Anthropic error body's `error` object (or a stand-in with the raw text)."""
    try:
        body = json.loads(detail)
    except ValueError:
        return {"message": detail[:500]}
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else {"message": detail[:500]}


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


def _error_message(detail: str) -> str:
    try:
        body = json.loads(detail)
    except ValueError:
        return detail[:500]
    error = body.get("error", body) if isinstance(body, dict) else body
    message = error.get("message", detail) if isinstance(error, dict) else str(error)
    return str(message)[:500]

"""`swarm api`: an OpenAI-compatible HTTP front door to the swarm, and the live swarm map.

    swarm api --peer 127.0.0.1:7001
    OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(model="smollm2-135m", ...)

Routes: `GET /` (the map page), `GET /v1/swarm` (the map's data: `swarm status --json` plus the RTTs
this server measured and the route of its latest answer), `GET /v1/models`,
`POST /v1/chat/completions`, `POST /v1/completions`.

One `SwarmClient` serves every request; each request opens its own chain of sessions on the peers
and closes it when its answer ends, when its HTTP client goes away (a failed write, a closed
transport, or the handler being cancelled), or on an error. Reading a request and turning token
ids into text deltas (stop strings, incomplete UTF-8) are pure and need no server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from . import wire
from .errors import ConfigError, NoRouteError, RemoteError, SwarmError
from .sampling import SamplingConfig
from .status import snapshot

log = logging.getLogger("swarm.api")

STATIC = Path(__file__).resolve().parent / "static"
MAX_STOP = 4  # as OpenAI: up to four stop sequences


@dataclass
class ApiConfig:
    model: str | None = None  # a local folder, a model name, or None: the swarm's (else the default); its manifest name is what we serve
    host: str = "127.0.0.1"  # loopback unless the user asks for more
    port: int = 8000  # 0 picks a free port (tests)
    api_key: str | None = None  # when set, every /v1 call needs `Authorization: Bearer <key>`
    bootstrap: tuple[str, ...] = ()  # "host:port" of swarm members
    mdns: bool = True  # also look for peers on the LAN
    discovery_timeout: float = 10.0  # seconds a request waits for a swarm that covers every block
    default_max_tokens: int = 512  # when a request names none: each token reserves cache on every peer
    write_timeout: float = 30.0  # seconds a stalled HTTP reader may hold its sessions
    ping_interval: float = 5.0  # seconds between RTT probes of known peers, for the map
    torch_threads: int | None = None  # intra-op threads for the local head
    mdns_interfaces: list[str] | None = None  # IPv4 addresses of interfaces for mDNS; None: all
    swarm_key: Any = None  # a private swarm's secret (swarm.secure.SwarmKey), None for public


# --- errors in OpenAI's shape ---------------------------------------------------------------------


class ApiError(Exception):
    """An answer of the form {"error": {message, type, param, code}} with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def to_json(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def swarm_error(e: SwarmError) -> ApiError:
    """Map the swarm's own errors to statuses: what the caller can fix is 400, the swarm is 503."""
    if isinstance(e, ConfigError):
        return ApiError(400, str(e))
    if isinstance(e, NoRouteError):
        return ApiError(503, str(e), type="server_error", code="no_route")
    if isinstance(e, RemoteError):
        return ApiError(503, f"the swarm failed to answer: {e}", type="server_error", code="swarm_unavailable")
    return ApiError(503, str(e), type="server_error", code="swarm_unavailable")


# --- reading a request (pure) ---------------------------------------------------------------------


@dataclass(frozen=True)
class GenRequest:
    """One completion request, checked against the model."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingConfig
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts


def message_text(content: Any, i: int) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ApiError(400, "only text content parts are supported", param=f"messages.[{i}].content")
            out.append(part["text"])
        return "".join(out)
    if content is None:
        return ""
    raise ApiError(400, "a message's content must be a string or a list of text parts", param=f"messages.[{i}].content")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
            raise ApiError(400, "each message needs a role of system, user or assistant", param=f"messages.[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": message_text(m.get("content"), i)})
    return out


def parse_prompt(body: dict[str, Any]) -> str | list[int]:
    """/v1/completions' prompt: a string, a list of one string, or token ids."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        return p
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise ApiError(400, "'prompt' must be a string or a list of token ids (one prompt per request)", param="prompt")


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ApiError(400, f"'{name}' must be a number in [{lo}, {hi}]", param=name)
    return float(v)


def _int(body: dict[str, Any], name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ApiError(400, f"'{name}' must be an integer", param=name)
    return v


def parse_request(body: Any, served_model: str, prompt_ids: Callable[[dict[str, Any]], list[int]], context_length: int, default_max_tokens: int) -> GenRequest:
    """Check a chat or text completion body; `prompt_ids(body)` encodes its messages or prompt."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model", served_model)
    if model != served_model:
        raise ApiError(404, f"The model '{model}' does not exist; this swarm serves '{served_model}'", param="model", code="model_not_found")
    n = _int(body, "n")
    if n not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    if body.get("logprobs") not in (None, False, 0):
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    top_k = _int(body, "top_k") or 0  # not OpenAI's, but common in compatible servers
    if top_k < 0:
        raise ApiError(400, "'top_k' must be >= 0", param="top_k")
    if top_p == 0.0:  # keeping only the most likely token is greedy decoding
        temperature, top_p = 0.0, 1.0
    seed = _int(body, "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and len(stop) <= MAX_STOP and all(isinstance(s, str) for s in stop):
        stops = tuple(s for s in stop if s)
    else:
        raise ApiError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings", param="stop")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    opts = body.get("stream_options") or {}
    include_usage = bool(isinstance(opts, dict) and opts.get("include_usage"))
    max_tokens = _int(body, "max_completion_tokens")
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens")
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, "'max_tokens' must be at least 1", param="max_tokens")

    ids = prompt_ids(body)
    if not ids:
        raise ApiError(400, "the prompt is empty", param="messages" if "messages" in body else "prompt")
    room = context_length - len(ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = len(ids) + (max_tokens or 1)
        raise ApiError(
            400,
            f"This model's maximum context length is {context_length} tokens. However, you requested {asked} tokens "
            f"({len(ids)} in the prompt, {max_tokens or 1} for the completion). Please reduce the prompt or max_tokens.",
            param="messages" if "messages" in body else "prompt",
            code="context_length_exceeded",
        )
    return GenRequest(
        prompt_ids=ids,
        max_tokens=max_tokens if max_tokens is not None else min(default_max_tokens, room),
        sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed),
        stop=stops,
        stream=stream,
        include_usage=include_usage,
    )


# --- token ids to text deltas (pure) --------------------------------------------------------------


class TextStream:
    """Token ids in, text deltas out, for streaming.

    Each push decodes every token so far (a token's text depends on its neighbours) and hands out
    the new suffix, holding back a trailing incomplete UTF-8 character (decoded as U+FFFD) and any
    tail that could be the start of a stop string. A stop string ends the text before it;
    `stopped` then says so. The deltas joined equal `text` at every point.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...] = ()) -> None:
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.text = ""  # handed out so far
        self.stopped = False  # a stop string was met

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.tokens.append(token)
        full = self.decode(self.tokens)
        cut = self._stop_at(full)
        if cut is not None:
            self.stopped = True
            return self._emit(full[:cut])
        safe = len(full.rstrip("\ufffd"))
        safe = min(safe, len(full) - self._stop_prefix(full))
        return self._emit(full[:safe])

    def finish(self) -> str:
        """The held-back tail once no token will follow."""
        if self.stopped:
            return ""
        full = self.decode(self.tokens)
        return self._emit(full)

    def _emit(self, upto: str) -> str:
        if len(upto) <= len(self.text) or not upto.startswith(self.text):
            return ""  # nothing new, or earlier text changed: wait until it settles
        delta = upto[len(self.text) :]
        self.text = upto
        return delta

    def _stop_at(self, full: str) -> int | None:
        found = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        return max(min(found), len(self.text)) if found else None

    def _stop_prefix(self, full: str) -> int:
        """The length of the longest tail of `full` that begins some stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best


# --- the map's data -------------------------------------------------------------------------------


def swarm_view(client: Any, stats: dict[str, int] | None = None) -> dict[str, Any]:
    """`swarm status --json`'s shape, plus each peer's RTT as this server measured it, the route
    of the latest answer, and the model served."""
    snap = snapshot(client.directory.all_peers())
    for row in snap["peers"]:
        rtt = client.rtt.rtt(row["peer_id"])
        row["rtt_ms"] = round(rtt, 3) if rtt is not None else None
    snap["last_route"] = client.last_route
    m = client.manifest
    snap["served"] = {"name": m.name, "model_hash": m.model_hash, "num_blocks": m.num_blocks, **(stats or {})}
    return snap


# --- the server -----------------------------------------------------------------------------------


class ApiServer:
    """Create with `await ApiServer.start(config)`; `await server.close()` when done."""

    def __init__(self, config: ApiConfig, client: Any) -> None:
        self.config = config
        self.client = client
        self.model_name = client.manifest.name
        cfg = client.head.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
        self.created = int(time.time())
        self.stats = {"requests_in_flight": 0, "requests_served": 0}
        self.runner: web.AppRunner | None = None
        self.address = ""
        self._pinger: asyncio.Task | None = None

    @classmethod
    async def start(cls, config: ApiConfig, client: Any = None) -> "ApiServer":
        """Connect to the swarm (unless a client is given), then listen."""
        if client is None:
            from .client import ClientConfig, SwarmClient

            client = await SwarmClient.connect(
                ClientConfig(
                    model=config.model, bootstrap=config.bootstrap, mdns=config.mdns, discovery_timeout=config.discovery_timeout,
                    torch_threads=config.torch_threads, mdns_interfaces=config.mdns_interfaces, swarm_key=config.swarm_key,
                )
            )
        self = cls(config, client)
        # handler_cancellation: a client that goes away cancels its handler, which closes its chain
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, config.host, config.port)
        try:
            await site.start()
        except OSError as e:
            await self.runner.cleanup()
            raise ConfigError(f"cannot listen on {config.host}:{config.port}: {e}") from None
        host, port = self.runner.addresses[0][:2]
        self.address = f"{'[' + host + ']' if ':' in host else host}:{port}"
        self._pinger = asyncio.create_task(self._ping_loop(), name="api rtt probes")
        return self

    async def close(self) -> None:
        if self._pinger:
            self._pinger.cancel()
            await asyncio.gather(self._pinger, return_exceptions=True)
        if self.runner:
            await self.runner.cleanup()
        await self.client.close()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._auth])
        app.router.add_get("/", self.map_page)
        app.router.add_get("/v1/swarm", self.swarm)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # --- middlewares ---------------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return web.json_response(e.to_json(), status=e.status)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return web.json_response(ApiError(e.status, e.reason, type="invalid_request_error").to_json(), status=e.status)
        except SwarmError as e:
            e2 = swarm_error(e)
            return web.json_response(e2.to_json(), status=e2.status)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return web.json_response(ApiError(500, "internal error in swarm api; see its log", type="server_error").to_json(), status=500)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Callable) -> web.StreamResponse:
        key = self.config.api_key
        if key and request.path.startswith("/v1/"):
            got = request.headers.get("Authorization", "")
            scheme, _, token = got.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
                raise ApiError(
                    401,
                    "Incorrect or missing API key: send `Authorization: Bearer <key>` with the key given to `swarm api --api-key`",
                    code="invalid_api_key",
                )
        return await handler(request)

    # --- simple routes -------------------------------------------------------------------------

    async def map_page(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "map.html", headers={"Cache-Control": "no-cache"})

    async def swarm(self, request: web.Request) -> web.Response:
        return web.json_response(swarm_view(self.client, self.stats), headers={"Cache-Control": "no-store"})

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "swarm"}

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._model_card()]})

    async def model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        if name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
        return web.json_response(self._model_card())

    # --- completions ---------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    def _prompt_ids(self, chat: bool) -> Callable[[dict[str, Any]], list[int]]:
        from .client import chat_ids

        tok = self.client.tokenizer

        def encode(body: dict[str, Any]) -> list[int]:
            if chat:
                msgs = parse_messages(body)
                if tok is None or not getattr(tok, "chat_template", None):
                    raise ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
                return chat_ids(tok, msgs)
            prompt = parse_prompt(body)
            if isinstance(prompt, list):
                vocab = int(getattr(self.client.head.config, "vocab_size", 0) or 0)
                if vocab and not all(0 <= t < vocab for t in prompt):
                    raise ApiError(400, f"token ids must be in [0, {vocab})", param="prompt")
                return prompt
            if tok is None:
                raise ApiError(400, "this model has no tokenizer; send the prompt as token ids", param="prompt")
            return list(tok(prompt)["input_ids"])

        return encode

    async def _body(self, request: web.Request) -> Any:
        try:
            return json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", code="invalid_json") from None

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._body(request)
        req = parse_request(body, self.model_name, self._prompt_ids(chat), self.context_length, self.config.default_max_tokens)
        answer = Answer(chat, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", int(time.time()), self.model_name, req)
        stats: dict[str, Any] = {}
        agen = self.client.stream(req.prompt_ids, req.max_tokens, req.sampling, stats=stats)
        text = TextStream(self.client.decode, req.stop)
        self.stats["requests_in_flight"] += 1
        try:
            try:
                first = await agen.__anext__()  # before any header, so a failure still gets its status
            except StopAsyncIteration:
                raise ApiError(503, "the swarm returned no token", type="server_error", code="swarm_unavailable") from None
            except SwarmError as e:
                raise swarm_error(e) from None
            if req.stream:
                return await self._stream(request, answer, agen, first, text)
            tokens = [first]
            text.push(first)
            try:
                if not text.stopped:
                    async for tok in agen:
                        tokens.append(tok)
                        text.push(tok)
                        if text.stopped:
                            break
            except SwarmError as e:
                raise swarm_error(e) from None
            text.finish()
            await agen.aclose()  # the route and timings land in `stats`
            body = answer.whole(text.text, self._finish_reason(text, tokens, req), len(tokens))
            body["swarm"] = {"route": stats["routes"][-1] if stats.get("routes") else [], "failovers": len(stats.get("failovers", []))}
            return web.json_response(body)
        finally:
            await agen.aclose()  # closes the chain's sessions on the peers, whatever happened
            self.stats["requests_in_flight"] -= 1
            self.stats["requests_served"] += 1

    def _finish_reason(self, text: TextStream, tokens: list[int], req: GenRequest) -> str:
        if text.stopped or (tokens and tokens[-1] in self.client.eos_ids()):
            return "stop"
        return "length"

    async def _stream(self, request: web.Request, answer: "Answer", agen: AsyncIterator[int], first: int, text: TextStream) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)

        async def send(obj: Any) -> None:
            data = b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"
            await asyncio.wait_for(resp.write(data), self.config.write_timeout)

        def gone() -> bool:
            t = request.transport
            return t is None or t.is_closing()

        tokens = [first]
        try:
            if answer.chat:
                await send(answer.chunk({"role": "assistant", "content": ""}))
            delta = text.push(first)
            if delta:
                await send(answer.chunk(delta))
            try:
                if not text.stopped:
                    async for tok in agen:
                        if gone():
                            log.info("%s: the client went away; closing its sessions", answer.id)
                            return resp
                        tokens.append(tok)
                        delta = text.push(tok)
                        if delta:
                            await send(answer.chunk(delta))
                        if text.stopped:
                            break
            except SwarmError as e:
                await send(swarm_error(e).to_json())  # the openai client raises on an error event
                return resp
            tail = text.finish()
            if tail:
                await send(answer.chunk(tail))
            await send(answer.chunk(None, self._finish_reason(text, tokens, answer.req)))
            if answer.req.include_usage:
                await send(answer.usage_chunk(len(tokens)))
            await send(b"[DONE]")
            await resp.write_eof()
        except (ConnectionError, asyncio.TimeoutError) as e:
            log.info("%s: the client went away (%s); closing its sessions", answer.id, type(e).__name__)
        return resp

    async def _ping_loop(self) -> None:
        """Measure the RTT to every known peer of our model now and then, so the map shows RTTs
        for peers that no answer has used yet."""
        while True:
            await asyncio.sleep(self.config.ping_interval)
            for view in self.client.directory.peers():
                try:
                    conn = await self.client.connection(view.peer_id)
                    t0 = time.perf_counter()
                    await conn.request(lambda rid: wire.Ping(rid), timeout=2.0)
                    self.client.observe(view.peer_id, (time.perf_counter() - t0) * 1000)
                except (SwarmError, OSError, ValueError) as e:
                    log.debug("cannot ping %s: %s", view.peer_id[:10], e)


@dataclass
class Answer:
    """The fixed parts of one response, and its JSON objects in OpenAI's shapes."""

    chat: bool
    id: str
    created: int
    model: str
    req: GenRequest

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "system_fingerprint": None}

    def usage(self, completion_tokens: int) -> dict[str, int]:
        p = len(self.req.prompt_ids)
        return {"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens}

    def whole(self, text: str, finish_reason: str, completion_tokens: int) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage(completion_tokens)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage(completion_tokens)}

    def chunk(self, delta: str | dict | None, finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            d = delta if isinstance(delta, dict) else ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish_reason}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta if isinstance(delta, str) else "", "logprobs": None, "finish_reason": finish_reason}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, completion_tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": self.usage(completion_tokens)}

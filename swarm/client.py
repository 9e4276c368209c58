"""The client: embeddings, final norm, LM head and sampling run here; the blocks run in the swarm.

    async with await SwarmClient.connect(ClientConfig(bootstrap=("127.0.0.1:7001",))) as client:
        result = await client.generate("What is the capital of France?")
        async for token in client.stream(ids, max_new_tokens=32):
            ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import compute, links, wire
from .blocks import Head
from .chain import Chain, FailoverEvent
from .directory import Directory
from .errors import ConfigError, ModelError, NoRouteError, PeerUnavailable, SwarmError
from .manifest import Manifest
from .routing import Candidate, Hop, Route, RttTracker, plan
from .sampling import SamplingConfig, sample
from .verify import VerifyPolicy
from .transport import Connection

log = logging.getLogger("swarm.client")

# the least the first answer waits for the swarm's table after connecting (a fresh directory's
# first refresh, or an mDNS answer), however long connecting took
_FIRST_WAIT_MIN_S = 2.0


@dataclass
class ClientConfig:
    model: str | None = None  # a local folder, a model name, or None: what the swarm serves (else the default)
    bootstrap: tuple[str, ...] = ()  # "host:port" of peers to ask for the table
    mdns: bool = True  # also look for peers on the LAN
    mdns_interfaces: list[str] | None = None  # IPv4 addresses of interfaces for mDNS; None: all
    discovery_timeout: float = 10.0  # seconds to wait for a swarm that covers every block
    wire_dtype: str = "float32"  # dtype of hidden states on the wire
    connect_timeout: float = 5.0  # seconds for a TCP (and TLS) connection
    max_failovers: int = 8  # replaced hops per answer before giving up
    route_grace_s: float = 3.0  # how long a broken route waits for a replacement peer to appear
    torch_threads: int | None = None  # intra-op threads for the local head
    swarm_key: Any = None  # a private swarm's shared secret (swarm.secure), None for public
    verify: float = 0.0  # fraction of steps a second peer re-computes and compares (1.0: all)
    push: bool = True  # steps go peer to peer (Forward.next; not long prompts); False: each hop via us


@dataclass
class GenerationResult:
    prompt_ids: list[int]
    tokens: list[int]
    text: str | None
    routes: list[list[dict]]
    failovers: list[FailoverEvent]
    ttft_s: float
    decode_tokens_per_s: float
    total_s: float
    verifications: list[dict] = field(default_factory=list)
    pushed_steps: int = 0  # steps handed peer to peer

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": len(self.prompt_ids),
            "tokens": self.tokens,
            "text": self.text,
            "route": self.routes[-1] if self.routes else [],
            "routes": self.routes,
            "failovers": [vars(e) for e in self.failovers],
            "pushed_steps": self.pushed_steps,
            "verification": {
                "checked": sum(1 for v in self.verifications if v["ok"] is not None),
                "mismatches": sum(1 for v in self.verifications if v["ok"] is False),
                "unverifiable": sum(1 for v in self.verifications if v["ok"] is None),
                "liars": sorted({v["liar"] for v in self.verifications if v.get("liar")}),
            },
            "timings": {
                "time_to_first_token_s": round(self.ttft_s, 4),
                "decode_tokens_per_s": round(self.decode_tokens_per_s, 2),
                "total_s": round(self.total_s, 4),
            },
        }


class SwarmClient:
    """Create with `await SwarmClient.connect(config)`; use as an async context manager."""

    def __init__(self, config: ClientConfig, manifest: Manifest, head: Head, tokenizer: Any, directory: Directory) -> None:
        self.config = config
        self.manifest = manifest
        self.head = head
        self.tokenizer = tokenizer
        self.directory = directory
        self.rtt = RttTracker()
        self._conns: dict[str, Connection] = {}
        self._conn_locks: dict[str, asyncio.Lock] = {}
        self.last_route: list[dict] = []
        self.active_chains: list[Chain] = []  # answers in progress (their open sessions)
        self._first_wait_until: float | None = None  # see `stream`

    @classmethod
    async def connect(cls, config: ClientConfig, manifest: Manifest | None = None) -> "SwarmClient":
        if config.torch_threads:
            compute.set_threads(config.torch_threads)
        t0 = time.monotonic()
        if manifest is None:  # prepared here, or learned from the swarm (its client's files fetched)
            from peers.join import JoinOptions, plan_client

            manifest = await plan_client(JoinOptions(
                model=config.model, bootstrap=config.bootstrap, mdns=config.mdns, mdns_interfaces=config.mdns_interfaces,
                discovery_timeout=config.discovery_timeout, swarm_key=config.swarm_key,
            ))
        head = await compute.run(Head.load, manifest)
        tokenizer = await compute.run(load_tokenizer, manifest)
        directory = Directory(
            manifest.model_hash, config.bootstrap, mdns=config.mdns, connect_timeout=config.connect_timeout,
            swarm_key=config.swarm_key, mdns_interfaces=config.mdns_interfaces,
        )
        await directory.start()
        self = cls(config, manifest, head, tokenizer, directory)
        self._first_wait_until = t0 + config.discovery_timeout
        directory.is_usable = lambda peer_id: not self.rtt.is_banned(peer_id, time.monotonic())
        return self

    async def __aenter__(self) -> "SwarmClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for c in list(self._conns.values()):
            await c.close()
        self._conns.clear()
        await self.directory.stop()

    # --- what the chain asks of us ---------------------------------------------------------------

    async def plan(self, start: int, end: int, before: str | None = None, after: str | None = None) -> Route:
        """The best route for blocks [start, end) (between the hops `before` and `after` when a
        chain is mended). If no usable peer covers them, ask the swarm again for up to
        `route_grace_s`: a replacement may have joined that we have not heard of."""
        deadline = time.monotonic() + self.config.route_grace_s
        while True:
            records = self.directory.peers()
            candidates = [Candidate(p.peer_id, p.start, p.end, max(p.ms_per_block, 0.01), float(p.sessions)) for p in records]
            ids = [p.peer_id for p in records]
            near = {p.peer_id: links.parse(dict(p.extra).get(links.FIELD), ids) for p in records} if self.config.push else None
            try:
                return plan(candidates, self.rtt, start, end, time.monotonic(), push=self.config.push, links=near, before=before, after=after)
            except NoRouteError:
                if time.monotonic() >= deadline:
                    raise
            await self.directory.refresh()
            await asyncio.sleep(0.2)

    async def refresh_rtts(self, pings: int = 3, max_peers: int = 16, timeout: float = 1.0) -> None:
        """Ping the candidates before routing a new answer, so a peer whose latency changed
        since we last used it is judged on today's figure (a few pings each, concurrently)."""
        peers = sorted(self.directory.peers(), key=lambda p: self.rtt.estimate(p.peer_id))[:max_peers]

        async def probe(peer_id: str) -> None:
            try:
                conn = await asyncio.wait_for(self.connection(peer_id), timeout * 2)
                for _ in range(pings):
                    t0 = time.perf_counter()
                    await conn.request(lambda rid: wire.Ping(rid), timeout=timeout)
                    self.rtt.observe(peer_id, (time.perf_counter() - t0) * 1000)
            except (SwarmError, asyncio.TimeoutError):
                pass  # routing will try it, or the ban list will keep it out

        await asyncio.gather(*(probe(p.peer_id) for p in peers))

    async def connection(self, peer_id: str) -> Connection:
        conn = self._conns.get(peer_id)
        if conn is not None and not conn.closed:
            return conn
        lock = self._conn_locks.setdefault(peer_id, asyncio.Lock())
        async with lock:
            conn = self._conns.get(peer_id)
            if conn is not None and not conn.closed:
                return conn
            view = self.directory.get(peer_id)
            if view is None:
                raise PeerUnavailable(f"peer {peer_id[:10]} is no longer known", peer=peer_id)
            conn = await self.directory.dial(view)
            t0 = time.perf_counter()
            await conn.request(lambda rid: wire.Ping(rid), timeout=self.config.connect_timeout)
            self.rtt.observe(peer_id, (time.perf_counter() - t0) * 1000)
            self._conns[peer_id] = conn
            return conn

    def expected_ms(self, hop: Hop, rows: int) -> float:
        # a prefill of many rows costs far less per row than single steps: count it as rows / 8
        return hop.rtt_ms + hop.compute_ms * max(1.0, rows / 8)

    def verifier_candidates(self, start: int, end: int, exclude: set[str]) -> list[Hop]:
        """Single peers that hold all of [start, end), cheapest first: who can check a hop."""
        now = time.monotonic()
        hops = []
        for p in self.directory.peers():
            if p.start <= start and end <= p.end and p.peer_id not in exclude and not self.rtt.is_banned(p.peer_id, now):
                rtt = self.rtt.estimate(p.peer_id)
                compute = p.ms_per_block * (end - start)
                hops.append(Hop(p.peer_id, start, end, rtt, compute, rtt + compute))
        return sorted(hops, key=lambda h: (h.cost, h.peer_id))

    def peer_format(self, peer_id: str) -> tuple[str, str]:
        rec = self.directory.get(peer_id)
        return (rec.dtype, rec.quant) if rec is not None else ("float32", "none")

    def record(self, peer_id: str) -> dict | None:
        rec = self.directory.get(peer_id)
        return rec.to_wire() if rec is not None else None

    def observe(self, peer_id: str, rtt_ms: float) -> None:
        self.rtt.observe(peer_id, rtt_ms)

    def ban(self, peer_id: str, seconds: float) -> None:
        self.rtt.ban(peer_id, time.monotonic(), seconds)
        conn = self._conns.pop(peer_id, None)
        if conn is not None:
            asyncio.get_running_loop().create_task(conn.close())

    # --- generation ------------------------------------------------------------------------------

    def _head_step(self, h: torch.Tensor, sampling: SamplingConfig, gen: torch.Generator | None) -> tuple[torch.Tensor, int, torch.Tensor]:
        """On the compute thread: logits of the last row, the sampled token, its embedding."""
        logits = self.head.logits(h)
        tok = sample(logits, sampling, gen)
        return logits, tok, self.head.embed_ids([tok])

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise ModelError("this model has no tokenizer; pass token ids instead of text")
        if chat and getattr(self.tokenizer, "chat_template", None):
            return chat_ids(self.tokenizer, prompt)
        return list(self.tokenizer(prompt)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def eos_ids(self) -> set[int]:
        eos = getattr(self.head.config, "eos_token_id", None)
        ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    async def stream(
        self,
        prompt_ids: list[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        stop_at_eos: bool = True,
        on_failover: Callable[[FailoverEvent], None] | None = None,
        stats: dict | None = None,
        logits_out: list[torch.Tensor] | None = None,
        before_step: Callable[[int], None] | None = None,
        on_verify: Callable[[dict], None] | None = None,
    ) -> AsyncIterator[int]:
        """Yield new token ids as they are produced. `stats` (a dict) receives the route and
        timings; `logits_out` (a list) receives each step's logits."""
        if not prompt_ids:
            raise ConfigError("the prompt is empty")
        if max_new_tokens < 1:
            raise ConfigError("max_new_tokens must be at least 1")
        wait = self.config.discovery_timeout
        if self._first_wait_until is not None:  # the first answer shares connect's time to find the swarm
            wait, self._first_wait_until = max(_FIRST_WAIT_MIN_S, self._first_wait_until - time.monotonic()), None
        await self.directory.wait_for_coverage(self.manifest.num_blocks, wait)
        chain = Chain(
            self, max_length=len(prompt_ids) + max_new_tokens, wire_dtype=self.config.wire_dtype,
            max_failovers=self.config.max_failovers, on_event=on_failover,
            verify=VerifyPolicy(self.config.verify, sampling.seed) if self.config.verify > 0 else None,
            on_verify=on_verify, push=self.config.push,
        )
        gen = sampling.generator()
        eos = self.eos_ids() if stop_at_eos else set()
        tokens: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        self.active_chains.append(chain)
        try:
            await chain.open(self.manifest.num_blocks)
            x = await compute.run(self.head.embed_ids, list(prompt_ids))
            for step in range(max_new_tokens):
                if before_step is not None:
                    before_step(step)  # tests use it to kill a peer at a chosen step
                try:
                    h = await chain.step(x)
                except NoRouteError as e:
                    e.tokens = list(tokens)
                    raise
                # norm, head, sampling and the next token's embedding: one hand-off per token
                logits, tok, x = await compute.run(self._head_step, h, sampling, gen)
                if logits_out is not None:
                    logits_out.append(logits)
                if t_first is None:
                    t_first = time.perf_counter()
                tokens.append(tok)
                yield tok
                if tok in eos:
                    break
        finally:
            self.last_route = chain.routes[-1] if chain.routes else []
            if stats is not None:
                t1 = time.perf_counter()
                n_decode = max(0, len(tokens) - 1)
                stats.update(
                    verifications=chain.verifications,
                    pushed_steps=chain.pushed_steps,
                    routes=chain.routes,
                    failovers=chain.failovers,
                    ttft_s=(t_first - t0) if t_first else 0.0,
                    decode_tokens_per_s=(n_decode / (t1 - t_first)) if t_first and n_decode else 0.0,
                    total_s=t1 - t0,
                )
            self.active_chains.remove(chain)
            await asyncio.shield(chain.close())

    async def generate(
        self,
        prompt: str | list[int],
        max_new_tokens: int = 128,
        sampling: SamplingConfig = SamplingConfig(),
        chat: bool = True,
        stop_at_eos: bool = True,
        on_token: Callable[[int], None] | None = None,
        on_failover: Callable[[FailoverEvent], None] | None = None,
        on_verify: Callable[[dict], None] | None = None,
    ) -> GenerationResult:
        ids = self.encode_prompt(prompt, chat) if isinstance(prompt, str) else list(prompt)
        stats: dict = {}
        tokens: list[int] = []
        async for tok in self.stream(ids, max_new_tokens, sampling, stop_at_eos, on_failover, stats, on_verify=on_verify):
            tokens.append(tok)
            if on_token:
                on_token(tok)
        return GenerationResult(
            prompt_ids=ids,
            tokens=tokens,
            text=self.decode(tokens) if self.tokenizer is not None else None,
            routes=stats["routes"],
            failovers=stats["failovers"],
            ttft_s=stats["ttft_s"],
            decode_tokens_per_s=stats["decode_tokens_per_s"],
            total_s=stats["total_s"],
            verifications=stats.get("verifications", []),
            pushed_steps=stats.get("pushed_steps", 0),
        )


def chat_ids(tokenizer, chat: str | list[dict[str, str]]) -> list[int]:
    """Token ids of a chat (or one user message) in the model's template, the assistant's turn opened."""
    messages = [{"role": "user", "content": chat}] if isinstance(chat, str) else chat
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(ids if isinstance(ids, list) else ids["input_ids"])  # transformers 5 returns a BatchEncoding


def load_tokenizer(manifest: Manifest):
    if not (manifest.root / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(manifest.root)

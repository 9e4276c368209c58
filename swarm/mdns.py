"""LAN discovery over mDNS: a thin asyncio adapter over zeroconf's asyncio API.

A peer registers `<peer id>._swarm._tcp.local.` with a TXT record (peer id, model hash, span,
port, protocol version) and browses for the others; a client only browses. What is found goes to
an `asyncio.Queue` (and an optional callback) as `Discovered`; the driver then dials it and lets
gossip take over, which is where liveness is judged: mDNS only introduces peers.

TXT values are untrusted strings: we check their shape (a valid peer id, a port) and nothing
else; the signed gossip record is the authority on what a peer serves.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from zeroconf import IPVersion, ServiceStateChange, Zeroconf, get_all_addresses
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from .identity import public_from_peer_id
from .tasks import TaskSet
from .wire import PROTOCOL_VERSION

log = logging.getLogger(__name__)

SERVICE_TYPE = "_swarm._tcp.local."
RESOLVE_TIMEOUT_MS = 3000
MAX_TXT_VALUE = 255  # a TXT string is at most 255 bytes including its key


@dataclass(frozen=True)
class Discovered:
    """A peer seen on the LAN. Unverified: dial it and check its gossip record."""

    peer_id: str
    host: str
    port: int
    txt: Mapping[str, str] = field(default_factory=dict)


def make_txt(model_hash: str, start: int, end: int) -> dict[str, str]:
    """The TXT fields a serving peer announces (id, port and version are added by start())."""
    return {"hash": model_hash, "span": f"{start}:{end}"}


class MdnsDiscovery:
    """Announce ourselves (optionally) and report the swarm peers on the LAN.

    No I/O until `start`; use `async with` or pair `start` with `stop`."""

    def __init__(
        self,
        peer_id: str,
        *,
        interfaces: list[str] | None = None,  # IPv4 addresses to use; None = every interface
        on_found: Callable[[Discovered], None] | None = None,  # called on the loop, must not block
        queue_size: int = 1024,  # found events kept for `found`; later ones dropped when full
    ) -> None:
        self.peer_id = peer_id
        self.interfaces = interfaces
        self.on_found = on_found
        #: every (re)resolved peer, in order; Updated TXT records come again
        self.found: asyncio.Queue[Discovered] = asyncio.Queue(queue_size)
        #: the peers currently announced on the LAN, by peer id
        self.peers: dict[str, Discovered] = {}
        self._azc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._port = 0
        self._tasks = TaskSet()  # resolutions in flight
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def instance_name(self) -> str:
        return f"{self.peer_id}.{SERVICE_TYPE}"

    async def start(self, port: int, txt: Mapping[str, str] | None) -> None:
        """Browse, and register on `port` unless `txt` is None (a client that only looks)."""
        if self._azc is not None:
            raise RuntimeError("MdnsDiscovery already started")
        self._loop = asyncio.get_running_loop()
        if self.interfaces is None:
            self._azc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        else:
            self._azc = AsyncZeroconf(interfaces=self.interfaces, ip_version=IPVersion.V4Only)
        self._port = port
        try:
            if txt is not None:
                self._info = self._service_info(txt)
                # the returned task finishes when the announcement went out
                await (await self._azc.async_register_service(self._info))
            self._browser = AsyncServiceBrowser(
                self._azc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
            )
        except BaseException:
            await self.stop()
            raise

    async def update(self, txt: Mapping[str, str]) -> None:
        """Announce a changed TXT record (our span or model)."""
        if self._azc is None or self._info is None:
            raise RuntimeError("update() needs start() with a txt record first")
        self._info = self._service_info(txt)
        await (await self._azc.async_update_service(self._info))

    async def stop(self) -> None:
        """Say goodbye (unregister), stop browsing and resolving, close the sockets."""
        azc, self._azc = self._azc, None
        if azc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        await self._tasks.cancel_all()
        if self._info is not None:
            await (await azc.async_unregister_service(self._info))
            self._info = None
        await azc.async_close()

    async def __aenter__(self) -> "MdnsDiscovery":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---- internals

    def _service_info(self, txt: Mapping[str, str]) -> AsyncServiceInfo:
        props = {**txt, "id": self.peer_id, "port": str(self._port), "v": str(PROTOCOL_VERSION)}
        for k, v in props.items():
            if len(k) + 1 + len(v.encode()) > MAX_TXT_VALUE:
                raise ValueError(f"TXT field {k!r} is longer than a TXT string allows")
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance_name,
            addresses=[socket.inet_aton(a) for a in self._addresses()],
            port=self._port,
            properties=props,
            server=f"{self.peer_id}.local.",
        )

    def _addresses(self) -> list[str]:
        if self.interfaces is not None:
            return [a for a in self.interfaces if _is_ipv4(a)]
        return [a for a in get_all_addresses() if not a.startswith("127.")] or ["127.0.0.1"]

    def _on_change(self, zeroconf: Zeroconf, service_type: str, name: str,
                   state_change: ServiceStateChange) -> None:
        """zeroconf calls this synchronously on the loop: schedule, never block."""
        if name == self.instance_name:
            return
        if state_change is ServiceStateChange.Removed:
            pid = name[: -len(SERVICE_TYPE) - 1]
            self.peers.pop(pid, None)
            return
        assert self._loop is not None
        self._tasks.spawn(self._resolve(name), self._loop)

    async def _resolve(self, name: str) -> None:
        if self._azc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._azc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("mdns: could not resolve %s", name)
            return
        found = _parse(info, name)
        if found is None or found.peer_id == self.peer_id:
            return
        self.peers[found.peer_id] = found
        try:
            self.found.put_nowait(found)
        except asyncio.QueueFull:
            log.warning("mdns: discovery queue full, dropping %s", found.peer_id[:10])
        if self.on_found is not None:
            self.on_found(found)


def _is_ipv4(a: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(a), ipaddress.IPv4Address)
    except ValueError:
        return False


def _parse(info: AsyncServiceInfo, name: str) -> Discovered | None:
    """A resolved service as Discovered, or None when it is not a well-formed swarm peer."""
    txt: dict[str, str] = {}
    for k, v in (info.properties or {}).items():
        if v is None:
            continue
        try:
            txt[k.decode()] = v.decode()
        except UnicodeDecodeError:
            return None
    pid = txt.get("id", "")
    try:
        public_from_peer_id(pid)
    except ValueError:
        return None
    if name != f"{pid}.{SERVICE_TYPE}" or info.port is None or not 0 < info.port < 65536:
        return None  # an instance name must be its own peer id: no announcing for others
    hosts = [a for a in info.parsed_addresses(IPVersion.V4Only)]
    if not hosts:
        return None
    return Discovered(pid, hosts[0], info.port, txt)

"""Engine discovery: a `dns+ws://NAME:PORT` entry stands for every address NAME resolves to.

On Kubernetes the engines run as a StatefulSet behind a headless Service, whose name resolves to one
address per ready pod; engines join and leave as pods come and go. So such an entry is resolved at
start and again every `every_secs`, and the pool is told the new list (engines that joined are added,
engines that left are dropped once their call ends). A resolution that fails keeps the last good list:
a DNS hiccup must not empty the fleet. `dns+wss://` gives `wss://IP:PORT`; certificate names are not
checked against an IP (PersonaPlex serves self-signed certificates; `verify_tls` is off by default),
so where they must be, list each engine's own name statically.
"""

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit, urlunsplit

from loguru import logger

DNS_SCHEMES = {"dns+ws": "ws", "dns+wss": "wss"}
DEFAULT_PORT = {"ws": 80, "wss": 443}


def is_dns(url: str) -> bool:
    return urlsplit(url).scheme in DNS_SCHEMES


def _host(address: str) -> str:
    return f"[{address}]" if ipaddress.ip_address(address).version == 6 else address


async def resolve(url: str) -> list[str]:
    """The engine URLs a `dns+ws(s)://` entry stands for, sorted; OSError when the name does not resolve."""
    parts = urlsplit(url)
    scheme = DNS_SCHEMES[parts.scheme]
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host name")
    port = parts.port or DEFAULT_PORT[scheme]
    infos = await asyncio.get_running_loop().getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    addresses = sorted({info[4][0] for info in infos})
    return [urlunsplit((scheme, f"{_host(a)}:{port}", parts.path, parts.query, "")) for a in addresses]


async def expand(urls: list[str], last: dict[str, list[str]] | None = None, resolver=resolve) -> list[str]:
    """Static URLs as given, DNS entries resolved (the last good answer in `last`, updated in place, when
    resolution fails); one list without duplicates, in the order given."""
    last = {} if last is None else last
    out: list[str] = []
    for url in urls:
        if not is_dns(url):
            out.append(url)
            continue
        try:
            last[url] = await resolver(url)
        except OSError as exc:
            logger.warning(f"engine discovery: {url} did not resolve ({exc}); keeping its {len(last.get(url, []))} known engines")
        out += last.get(url, [])
    return list(dict.fromkeys(out))


class Discovery:
    """Re-resolves the DNS entries of `urls` every `every_secs` and calls `on_change(urls)` when the list changes.

    `resolver(url) -> [urls]`: `resolve`, the system's resolver, unless a test serves its own names."""

    def __init__(self, urls: list[str], every_secs: float, on_change: Callable[[list[str]], Awaitable[None] | None], resolver=None):
        self.urls, self.every_secs, self._on_change = list(urls), every_secs, on_change
        self._resolver = resolver or resolve
        self.current: list[str] = []
        self._last: dict[str, list[str]] = {}
        self._task: asyncio.Task | None = None

    @property
    def dynamic(self) -> bool:
        return any(is_dns(u) for u in self.urls)

    async def refresh(self) -> list[str]:
        found = await expand(self.urls, self._last, self._resolver)
        if found != self.current:
            joined, left = set(found) - set(self.current), set(self.current) - set(found)
            logger.info(f"engine discovery: {len(joined)} joined, {len(left)} left; {len(found)} engines")
            self.current = found
            result = self._on_change(found)
            if asyncio.iscoroutine(result):
                await result
        return found

    async def start(self) -> list[str]:
        """The first list now; re-resolution in the background where there is anything to resolve."""
        found = await self.refresh()
        if self.dynamic:
            self._task = asyncio.create_task(self._loop(), name="engine-discovery")
        return found

    async def _loop(self):
        while True:
            await asyncio.sleep(self.every_secs)
            try:
                await self.refresh()
            except Exception:  # a bug here must not stop discovery for good
                logger.exception("engine discovery: refresh failed")

    async def stop(self):
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

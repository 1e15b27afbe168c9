"""The deployment's engine pools: each call's engine comes from one of them.

One pool per distinct engine list (engine.urls, or a processor's own `url:`), each the process's own
(pool.py) or, with `lease_store`, the fleet's, shared by every bridge replica through Redis
(shared_pool.py). A list with dns+ws:// entries is resolved at start and again every `discover_secs`
(discovery.py); its pool follows the engines that join and leave.
"""

from processors.personaplex.discovery import Discovery, is_dns
from processors.personaplex.pool import Engine, EnginePool, PoolParams
from processors.personaplex.shared_pool import SharedEnginePool


class EnginePools:
    """The deployment's pool, plus one per processor whose own `url:` names other engines; all
    shared by every call, so the exclusivity holds across calls."""

    def __init__(self, params: PoolParams | None):
        self._params = params
        self.pools: dict[tuple[str, ...], EnginePool] = {}
        self._discoveries: list[Discovery] = []
        if params is not None and params.urls:
            self.pools[tuple(params.urls)] = _new_pool(params)

    @classmethod
    def of(cls, urls: str) -> "EnginePools":
        return cls(PoolParams(urls=urls))

    def get(self, urls: str | None) -> EnginePool:
        """The pool for a processor's own `url:` (comma-separated), else the deployment's."""
        if urls:
            params = (self._params or PoolParams()).model_copy(update={"urls": PoolParams(urls=urls).urls})
            key = tuple(params.urls)
            for other in self.pools:
                if other != key and set(other) & set(key):
                    raise ValueError(f"engine URLs {', '.join(sorted(set(other) & set(key)))} are in two pools "
                                     "(engine.urls and a processor's url): one engine serves one call, so list each in one place")
            if key not in self.pools:
                self.pools[key] = _new_pool(params)
            return self.pools[key]
        if not self.pools:
            raise ValueError("no engine configured: set engine.urls (or PERSONAPLEX_URL), or the processor's url")
        return next(iter(self.pools.values()))

    @property
    def engines(self) -> list[Engine]:
        return [e for pool in self.pools.values() for e in pool.engines]

    @property
    def available(self) -> bool:
        """Every pool has an engine in rotation (vacuously true with no engine in use)."""
        return all(pool.available for pool in self.pools.values())

    def snapshot(self) -> list[dict]:
        return [row for pool in self.pools.values() for row in pool.snapshot()]

    def problem(self) -> str | None:
        """Why not every pool can serve a call now (a shared pool's store unreachable, no engine in rotation)."""
        return next((pool.problem for pool in self.pools.values() if pool.problem), None)

    async def start(self) -> None:
        """Resolve the dns+ws:// entries (and keep re-resolving them); connect the shared pools to their store."""
        for urls, pool in self.pools.items():
            if any(is_dns(url) for url in urls):
                discovery = Discovery(list(urls), pool.params.discover_secs, pool.set_urls)
                self._discoveries.append(discovery)
                await discovery.start()
            await pool.start()

    async def close(self) -> None:
        for discovery in self._discoveries:
            await discovery.stop()
        for pool in self.pools.values():
            await pool.close()


def _new_pool(params: PoolParams):
    """The process's own pool, or with `lease_store` the fleet's, shared by every replica through Redis."""
    if params.lease_store:
        return SharedEnginePool(params, params.lease_store, lease_ttl_secs=params.lease_ttl_secs, capacity=params.capacity)
    return EnginePool(params)

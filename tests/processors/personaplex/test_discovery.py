"""Engine discovery against the machine's real resolver: `localhost` and the hosts file stand for a headless Service."""

import socket

import pytest

from processors.personaplex.discovery import Discovery, expand, is_dns, resolve


def localhost_addresses() -> set[str]:
    return {info[4][0] for info in socket.getaddrinfo("localhost", 8998, type=socket.SOCK_STREAM)}


async def test_a_dns_entry_stands_for_every_address_of_its_name():
    urls = await resolve("dns+ws://localhost:8998/api/chat")
    expected = {f"ws://{'[' + a + ']' if ':' in a else a}:8998/api/chat" for a in localhost_addresses()}
    assert set(urls) == expected and urls == sorted(urls)
    assert (await resolve("dns+wss://localhost"))[0].startswith("wss://") and ":443" in (await resolve("dns+wss://localhost"))[0]


async def test_static_urls_stay_as_given_and_duplicates_go():
    urls = await expand(["ws://gpu1:8998", "dns+ws://localhost:8998", "ws://gpu1:8998"])
    assert urls[0] == "ws://gpu1:8998" and urls.count("ws://gpu1:8998") == 1 and len(urls) == 1 + len(localhost_addresses())
    assert is_dns("dns+wss://x") and not is_dns("wss://x")


async def test_a_failed_resolution_keeps_the_last_good_list():
    last = {"dns+ws://engines.invalid:8998": ["ws://10.0.0.7:8998"]}  # .invalid never resolves (RFC 6761)
    assert await expand(["dns+ws://engines.invalid:8998"], last) == ["ws://10.0.0.7:8998"]
    assert await expand(["dns+ws://engines.invalid:8998"]) == []  # nothing known yet: nothing


async def test_discovery_reports_only_changes():
    seen = []
    d = Discovery(["dns+ws://localhost:8998"], every_secs=3600, on_change=seen.append)
    first = await d.start()
    assert seen == [first] and d.dynamic
    d.urls.append("ws://gpu9:8998")  # an engine joins
    await d.refresh()
    await d.refresh()  # nothing changed: no call
    assert len(seen) == 2 and seen[-1][-1] == "ws://gpu9:8998"
    await d.stop()


@pytest.mark.parametrize("bad", ["dns+ws://:8998"])
async def test_an_entry_without_a_name_is_refused(bad):
    with pytest.raises(ValueError):
        await resolve(bad)


async def test_a_pool_follows_the_names_as_engines_join_and_leave():
    """The resolver here is a table the test edits, as pods come and go behind a headless Service."""
    from processors.personaplex.pool import EnginePool, PoolParams, State

    table = {"dns+ws://engines:8998": ["ws://10.0.0.1:8998"]}

    async def resolver(url):
        if not table[url]:
            raise socket.gaierror("no address")
        return table[url]

    pool = EnginePool(PoolParams(urls="dns+ws://engines:8998"))
    d = Discovery(["dns+ws://engines:8998"], every_secs=3600, on_change=pool.set_urls, resolver=resolver)
    await d.start()
    assert [e.url for e in pool.engines] == ["ws://10.0.0.1:8998"]
    held = await pool.acquire("call")
    table["dns+ws://engines:8998"] = ["ws://10.0.0.2:8998"]  # a new pod; the old one is leaving
    await d.refresh()
    assert [e.url for e in pool.engines] == ["ws://10.0.0.2:8998"] and held.state is State.BUSY
    table["dns+ws://engines:8998"] = []  # the name fails to resolve: the last good list stays
    await d.refresh()
    assert [e.url for e in pool.engines] == ["ws://10.0.0.2:8998"]
    pool.release(held)
    assert (await pool.acquire("next")).url == "ws://10.0.0.2:8998"
    await d.stop()
    await pool.close()

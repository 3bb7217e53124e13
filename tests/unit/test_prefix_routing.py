"""Cache-aware replica choice: the block hashes of a request's text, the
per-replica index, the scoring against load, and consistent hashing."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from services.common.types import EngineLoad, GenerationRequest, Message
from services.router import hash_ring
from services.router.prefix_choice import PrefixRouter, PrefixSettings
from services.router.prefix_index import PrefixIndex, block_hashes, canonical_text


@dataclass(eq=False)
class R:
    address: str
    in_flight: int = 0
    load: EngineLoad | None = None
    in_flight_at_report: int = 0


def conversation(system: str, *turns: str) -> GenerationRequest:
    messages = [Message("system", system)]
    for i, text in enumerate(turns):
        messages.append(Message("user" if i % 2 == 0 else "assistant", text))
    return GenerationRequest(model_id="m", messages=tuple(messages))


def words(seed: int, n: int = 900) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps"]) for _ in range(n))


# --- text and hashes -----------------------------------------------------


def test_blocks_chain_so_a_block_matches_only_after_the_same_beginning():
    a = block_hashes("x" * 8 + "y" * 8, 8)
    b = block_hashes("z" * 8 + "y" * 8, 8)
    assert len(a) == len(b) == 2
    assert a[1] != b[1]  # same second block, different history
    assert block_hashes("x" * 8 + "y" * 8 + "tail", 8) == a  # a short tail is left out
    assert block_hashes("short", 8) == []


def test_blocks_cut_characters_not_bytes():
    text = "é" * 16
    assert len(block_hashes(text, 8)) == 2
    assert block_hashes(text, 8) != block_hashes("e" * 16, 8)


def test_canonical_text_keeps_roles_and_order_apart():
    one = GenerationRequest("m", messages=(Message("user", "ab"), Message("user", "c")))
    two = GenerationRequest("m", messages=(Message("user", "a"), Message("user", "bc")))
    role = GenerationRequest("m", messages=(Message("system", "ab"), Message("user", "c")))
    texts = {canonical_text(r) for r in (one, two, role)}
    assert len(texts) == 3
    scenario = GenerationRequest("m", scenario="support", messages=one.messages)
    assert canonical_text(scenario) != canonical_text(one)


def test_a_later_turn_extends_the_earlier_turns_hashes():
    system = words(1)
    first = PrefixRouter().hashes(conversation(system, "question one"))
    second = PrefixRouter().hashes(conversation(system, "question one", "answer", "two"))
    assert len(first) >= 15
    assert second[: len(first)] == first


# --- the index -----------------------------------------------------------


def test_index_matches_leading_blocks_only():
    index = PrefixIndex(100)
    hashes = block_hashes(words(2), 64)
    index.insert(hashes[:5])
    assert index.match(hashes) == 5
    assert index.match(block_hashes(words(3), 64)) == 0  # another text
    assert index.match([]) == 0


def test_index_is_bounded_and_evicts_least_recently_used_tails_first():
    index = PrefixIndex(6)
    a = block_hashes(words(3), 64)[:4]
    b = block_hashes(words(4), 64)[:4]
    index.insert(a)
    index.insert(b)
    assert len(index) == 6
    # a's two tail blocks went first: a's prefix outlives its continuation.
    assert index.match(a) == 2 and index.match(b) == 4
    index.insert(a[:1])  # a's first block used again
    index.insert(block_hashes(words(5), 64)[:1])
    assert a[0] in index  # recently used: kept
    assert index.match(b) == 4 and index.match(a) == 1  # a[1] was the oldest
    with pytest.raises(ValueError):
        PrefixIndex(0)


# --- scoring ---------------------------------------------------------------


def test_no_match_and_no_whole_block_leaves_the_choice_to_load():
    router = PrefixRouter()
    idle, busy = R("a:1"), R("b:1", load=EngineLoad(running=3))
    short = GenerationRequest("m", inputs="hi")
    choice = router.route([busy, idle], short, 0)
    assert choice is not None and choice.replica is idle and choice.reason == "load"
    assert router.route([], short, 0) is None


def test_the_replica_holding_the_prefix_wins_against_a_little_more_load():
    router = PrefixRouter(PrefixSettings(balance_abs=2))
    a, b = R("a:1"), R("b:1")
    turn1 = conversation(words(6), "question")
    first = router.route([a, b], turn1, 0)
    assert first is not None
    holder = first.replica
    other = b if holder is a else a
    holder.in_flight = 2  # two more requests than the other: within the threshold
    turn2 = conversation(words(6), "question", "answer", "next")
    second = router.route([a, b], turn2, 1)
    assert second is not None and second.replica is holder and second.reason == "prefix"
    assert second.matched == len(first.hashes)
    assert router.stats.hits == 1 and router.stats.requests == 2
    # A different conversation matches nothing on either replica.
    fresh = router.choose([a, b], router.hashes(conversation(words(7), "q")), 0)
    assert fresh is not None and fresh.matched == 0 and fresh.best_matched == 0
    assert other is not holder


def test_longest_match_wins():
    router = PrefixRouter()
    a, b = R("a:1"), R("b:1")
    system = words(8)
    hashes = router.hashes(conversation(system, "q", "answer", "next question"))
    router.index("a:1").insert(hashes[:3])
    router.index("b:1").insert(hashes[:-1])
    choice = router.choose([a, b], hashes, 0)
    assert choice is not None and choice.replica is b and choice.matched == len(hashes) - 1


def test_balance_threshold_spills_a_hot_prefix():
    settings = PrefixSettings(balance_abs=3, balance_rel=1.5)
    router = PrefixRouter(settings)
    a, b = R("a:1"), R("b:1")
    hot = router.hashes(conversation(words(9), "same question"))
    router.index("a:1").insert(hot)
    # 4 more than b and more than 1.5x: a is too busy despite its match.
    a.load, b.load = EngineLoad(running=5), EngineLoad(running=1)
    choice = router.choose([a, b], hot, 0)
    assert choice is not None and choice.replica is b and choice.matched == 0
    # Only 3 more: within the absolute threshold, the match wins.
    a.load = EngineLoad(running=4)
    choice = router.choose([a, b], hot, 0)
    assert choice is not None and choice.replica is a and choice.reason == "prefix"
    # Many more, but not 1.5x as many: still the match.
    a.load, b.load = EngineLoad(running=40), EngineLoad(running=30)
    choice = router.choose([a, b], hot, 0)
    assert choice is not None and choice.replica is a


def test_a_full_kv_cache_is_too_busy_when_another_is_not():
    router = PrefixRouter()
    a, b = R("a:1", load=EngineLoad(kv_cache_usage=0.95)), R("b:1", load=EngineLoad(running=2))
    hashes = router.hashes(conversation(words(10), "q"))
    router.index("a:1").insert(hashes)
    choice = router.choose([a, b], hashes, 0)
    assert choice is not None and choice.replica is b


def test_a_hot_prefix_spreads_over_replicas_as_load_grows():
    router = PrefixRouter(PrefixSettings(balance_abs=2, balance_rel=1.5))
    replicas = [R(f"r{i}:1") for i in range(3)]
    request = conversation(words(11), "the same question every time")
    for turn in range(30):
        choice = router.route(replicas, request, turn)
        assert choice is not None
        choice.replica.in_flight += 1  # nobody finishes
    low, high = min(r.in_flight for r in replicas), max(r.in_flight for r in replicas)
    # Never beyond the threshold (by one: the last request may have crossed it).
    assert low > 0
    assert high <= max(low + 2, low * 1.5) + 1


def test_min_match_share_ignores_a_short_match():
    router = PrefixRouter(PrefixSettings(min_match_share=0.5))
    a, b = R("a:1"), R("b:1")
    hashes = router.hashes(conversation(words(12), "q"))
    router.index("a:1").insert(hashes[:2])
    router.index("b:1").insert(hashes[:2])
    choice = router.choose([a, b], hashes, 0)
    preferred = hash_ring.preferred(hashes[0], ["a:1", "b:1"])
    assert choice is not None and choice.reason == "affinity"
    assert choice.replica.address == preferred


def test_with_no_match_load_decides_and_the_preferred_replica_breaks_ties():
    a, b = R("a:1"), R("b:1")
    hashes = PrefixRouter().hashes(conversation(words(13), "q"))
    preferred = a if hash_ring.preferred(hashes[0], ["a:1", "b:1"]) == "a:1" else b
    other = b if preferred is a else a
    choice = PrefixRouter().choose([a, b], hashes, 1)
    assert choice is not None and choice.replica is preferred and choice.reason == "affinity"
    preferred.in_flight = 1  # one more than the other: load decides
    choice = PrefixRouter().choose([a, b], hashes, 0)
    assert choice is not None and choice.replica is other and choice.reason == "load"
    # A slack of one keeps the preferred replica while it is one request busier.
    lenient = PrefixRouter(PrefixSettings(affinity_slack=1))
    choice = lenient.choose([a, b], hashes, 0)
    assert choice is not None and choice.replica is preferred
    preferred.in_flight = 2
    choice = lenient.choose([a, b], hashes, 0)
    assert choice is not None and choice.replica is other


# --- consistent hashing and agreement ----------------------------------------


def test_only_the_leaving_replicas_keys_move():
    nodes = [f"10.0.0.{i}:50061" for i in range(5)]
    keys = [i.to_bytes(8, "big") for i in range(2000)]
    before = {k: hash_ring.preferred(k, nodes) for k in keys}
    counts = {n: sum(v == n for v in before.values()) for n in nodes}
    assert min(counts.values()) > 2000 / 5 * 0.7  # spread evenly enough
    gone = nodes[2]
    after = {k: hash_ring.preferred(k, [n for n in nodes if n != gone]) for k in keys}
    moved = {k for k in keys if before[k] != after[k]}
    assert moved == {k for k in keys if before[k] == gone}
    # Order of the nodes never matters; no node, no choice.
    assert all(hash_ring.preferred(k, list(reversed(nodes))) == before[k] for k in keys[:50])
    assert hash_ring.preferred(b"k", []) is None


def test_two_routers_that_share_nothing_send_a_conversation_to_one_replica():
    one, two = PrefixRouter(), PrefixRouter()
    replicas = [R(f"r{i}:1") for i in range(4)]
    for c in range(20):
        system = words(100 + c)
        history: list[str] = []
        engines = set()
        for t in range(4):
            history += [f"question {t}"]
            router = one if t % 2 == 0 else two  # turns alternate between routers
            choice = router.route(replicas, conversation(system, *history), t)
            assert choice is not None
            engines.add(choice.replica.address)
            history += [f"answer {t}"]
        assert len(engines) == 1
    # The second router's first sight of each conversation was an affinity choice
    # and its second a prefix hit.
    assert two.stats.requests == 40 and two.stats.hits == 20


def test_a_replica_that_leaves_keeps_the_others_conversations_in_place():
    router = PrefixRouter()
    replicas = [R(f"r{i}:1") for i in range(3)]
    requests = [conversation(words(200 + c), "q") for c in range(30)]
    placed = {}
    for i, request in enumerate(requests):
        choice = router.route(replicas, request, i)
        assert choice is not None
        placed[i] = choice.replica
    gone = replicas[0]
    router.forget(gone.address)
    rest = replicas[1:]
    for i, request in enumerate(requests):
        choice = router.choose(rest, router.hashes(request), i)
        assert choice is not None
        if placed[i] is not gone:
            assert choice.replica is placed[i] and choice.reason == "prefix"


def test_settings_are_checked():
    for bad in (
        {"block_chars": 0},
        {"capacity_blocks": 0},
        {"balance_abs": -1},
        {"balance_rel": 0.5},
        {"min_match_share": 2.0},
        {"affinity_slack": -1},
    ):
        with pytest.raises(ValueError):
            PrefixSettings(**bad)  # type: ignore[arg-type]


# --- over engines that cache prefixes ------------------------------------------


async def test_two_routers_make_the_engines_reuse_each_conversations_prefix():
    """Two routers that share nothing take turns on each conversation; the
    engines (TGI doubles that model a prefix cache) report what they reused."""
    import aiohttp

    from services.cpu_backend.settings import ServerSettings
    from tools.tgi_double import PrefixCache, ScriptedEngine, serve

    settings = ServerSettings(model_id="m", max_input_tokens=4000, max_total_tokens=4100)

    def engine() -> ScriptedEngine:
        return ScriptedEngine(model_id="m", context_length=4100, prefix_cache=PrefixCache(65_536))

    async with serve(settings, engine()) as one, serve(settings, engine()) as two:
        replicas = [R(one.url), R(two.url)]
        routers = [PrefixRouter(), PrefixRouter()]

        async def run(policy: str) -> list[tuple[int, int, int]]:
            """(turn, prompt tokens, cached tokens) of every turn."""
            out = []
            async with aiohttp.ClientSession() as session:
                for c in range(4):
                    system = f"policy {policy}: " + words(300 + c, 200)
                    history: list[str] = []
                    for t in range(3):
                        history.append(f"question {t} of {c}")
                        request = conversation(system, *history)
                        if policy == "round-robin":
                            replica = replicas[t % 2]
                        else:
                            choice = routers[t % 2].route(replicas, request, t)
                            assert choice is not None
                            replica = choice.replica
                        prompt = " ".join(m.content for m in request.messages)
                        body = {"inputs": prompt, "parameters": {"max_new_tokens": 2,
                                                                 "details": True}}
                        async with session.post(f"{replica.address}/generate", json=body) as r:
                            reply = await r.json()
                        out.append((t, len(prompt.split()), reply["details"]["cached_tokens"]))
                        history.append(reply["generated_text"])
            return out

        for t, prompt, cached in await run("cache-aware"):
            if t > 0:
                assert cached >= prompt * 0.8, (t, prompt, cached)
        spread = await run("round-robin")
        assert all(cached == 0 for t, _, cached in spread if t == 1)  # turn 2 on the other engine

"""Cache-aware choice of replica: send a request where its prefix is cached,
unless that replica is much busier than the others.

For each request the router computes the chained block hashes of its
canonical text (services.router.prefix_index) and looks them up in every
candidate's index. Then, in order:

1. Balance. A replica is too busy when its estimated requests (the same
   estimate as the `load` policy: the engine's report corrected by the
   router's own requests since) exceed the least busy replica's by more
   than `balance_abs` AND by a factor above `balance_rel`, or when its KV
   cache is nearly full while another's is not (vLLM router's
   --balance-abs-threshold / --balance-rel-threshold, applied per replica).
   Too busy replicas are left out, so a hot prefix spills to other replicas
   instead of queueing on one; the spilled requests then warm those.
2. Prefix. Among the others, the replica with the longest match wins when
   it covers at least `min_match_share` of the prompt's blocks; equal
   matches go to the preferred replica (below), then the least busy.
3. Affinity. With no match, the preferred replica, chosen by rendezvous
   hashing of the first block over the candidates (services.router.hash_ring),
   takes it if it has at most `affinity_slack` requests more than the least
   busy replica. Routers that share nothing therefore send the turns of one
   conversation to one replica: they agree on the first block's preferred
   replica, and when one leaves only its prefixes move. The slack is small
   because a conversation's first turn placed by hash alone can leave one
   replica with several conversations while another idles.
4. Load. Otherwise (no whole block, or the preferred replica busier than
   that), the `load` policy decides, as without this feature.

The chosen replica's index then records the request's blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Literal, Protocol, TypeVar

from services.common.types import GenerationRequest
from services.router import hash_ring
from services.router.choice import Candidate, choose, load_rank
from services.router.prefix_index import (
    BLOCK_CHARS,
    CAPACITY_BLOCKS,
    PrefixIndex,
    block_hashes,
    canonical_text,
)

Reason = Literal["prefix", "affinity", "load"]


class AddressedCandidate(Candidate, Protocol):
    """A replica as services.router.choice sees it, plus a name every router
    agrees on (its adapter's address)."""

    @property
    def address(self) -> str: ...


C = TypeVar("C", bound=AddressedCandidate)


@dataclass(frozen=True)
class PrefixSettings:
    # Characters per block of canonical text.
    block_chars: int = BLOCK_CHARS
    # Blocks remembered per replica (imitates the engine's cache size).
    capacity_blocks: int = CAPACITY_BLOCKS
    # A replica is too busy when its requests exceed the least busy one's by
    # more than balance_abs AND are more than balance_rel times as many.
    balance_abs: int = 4
    balance_rel: float = 1.5
    # The least share of the prompt's blocks a match must cover to count.
    min_match_share: float = 0.0
    # With no match, the preferred replica takes the request only while its
    # requests are at most this many above the least busy replica's: 0 (load
    # decides, the preferred replica breaks its ties) keeps the balance of
    # `load`; more lets routers agree under uneven load, at balance's cost.
    affinity_slack: int = 0

    def __post_init__(self) -> None:
        if self.block_chars < 1 or self.capacity_blocks < 1:
            raise ValueError("block_chars and capacity_blocks must be at least 1")
        if self.balance_abs < 0 or self.balance_rel < 1.0 or self.affinity_slack < 0:
            raise ValueError("balance_abs and affinity_slack must be >= 0, balance_rel >= 1")
        if not 0.0 <= self.min_match_share <= 1.0:
            raise ValueError("min_match_share must be between 0 and 1")


@dataclass(frozen=True)
class PrefixChoice(Generic[C]):
    """The replica chosen for one request, and why."""

    replica: C
    reason: Reason
    # The request's whole blocks, and how many of them lead the chosen
    # replica's index (its expected cache hit), and the best match anywhere.
    hashes: tuple[bytes, ...]
    matched: int
    best_matched: int

    @property
    def hit(self) -> bool:
        return self.matched > 0


@dataclass
class PrefixStats:
    """Counts for metrics: requests routed, those sent to a replica holding
    part of their prefix, and those for which some replica held part of it."""

    requests: int = 0
    hits: int = 0
    could_hit: int = 0
    blocks: int = 0
    matched_blocks: int = 0

    @property
    def hit_share(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


class PrefixRouter:
    """The per-replica indexes of one model and the choice over them.

    Transport-free and synchronous; replicas are named by address, so it
    holds no reference to a connection.
    """

    def __init__(self, settings: PrefixSettings | None = None) -> None:
        self.settings = settings or PrefixSettings()
        self.indexes: dict[str, PrefixIndex] = {}
        self.stats = PrefixStats()

    def hashes(self, request: GenerationRequest) -> tuple[bytes, ...]:
        return tuple(block_hashes(canonical_text(request), self.settings.block_chars))

    def index(self, address: str) -> PrefixIndex:
        index = self.indexes.get(address)
        if index is None:
            index = self.indexes[address] = PrefixIndex(self.settings.capacity_blocks)
        return index

    def forget(self, address: str) -> None:
        """Drop a replica's index (it left, or its engine restarted empty)."""
        self.indexes.pop(address, None)

    def choose(
        self, candidates: Sequence[C], hashes: Sequence[bytes], turn: int
    ) -> PrefixChoice[C] | None:
        """The replica for a request with these block hashes; nothing is recorded."""
        if not candidates:
            return None
        hashes = tuple(hashes)
        if not hashes:
            replica = choose(candidates, "load", turn)
            assert replica is not None
            return PrefixChoice(replica, "load", hashes, 0, 0)
        s = self.settings
        ranks = [load_rank(r) for r in candidates]
        least_full, least = min(ranks)
        eligible: list[tuple[C, tuple[bool, int]]] = []
        for r, (full, requests) in zip(candidates, ranks, strict=True):
            too_busy = (full and not least_full) or (
                requests - least > s.balance_abs and requests > least * s.balance_rel
            )
            if not too_busy:
                eligible.append((r, (full, requests)))
        matches = {id(r): self._match(r.address, hashes) for r in candidates}
        best_anywhere = max(matches.values())
        preferred = hash_ring.preferred(hashes[0], (r.address for r in candidates))
        best = max(matches[id(r)] for r, _ in eligible)
        if best > 0 and best >= s.min_match_share * len(hashes):
            tied = [(r, rank) for r, rank in eligible if matches[id(r)] == best]
            top = min((r.address != preferred, rank) for r, rank in tied)
            winners = [r for r, rank in tied if (r.address != preferred, rank) == top]
            return PrefixChoice(winners[turn % len(winners)], "prefix", hashes, best, best_anywhere)
        for r, (full, requests) in eligible:
            if r.address == preferred and not full and requests <= least + s.affinity_slack:
                return PrefixChoice(r, "affinity", hashes, matches[id(r)], best_anywhere)
        replica = choose([r for r, _ in eligible], "load", turn)
        assert replica is not None
        return PrefixChoice(replica, "load", hashes, matches[id(replica)], best_anywhere)

    def record(self, choice: PrefixChoice[C]) -> None:
        """The request goes to `choice.replica`: its engine will hold these blocks."""
        self.index(choice.replica.address).insert(choice.hashes)
        st = self.stats
        st.requests += 1
        st.hits += choice.hit
        st.could_hit += choice.best_matched > 0
        st.blocks += len(choice.hashes)
        st.matched_blocks += choice.matched

    def route(
        self, candidates: Sequence[C], request: GenerationRequest, turn: int
    ) -> PrefixChoice[C] | None:
        """Choose a replica for `request` and record it there."""
        choice = self.choose(candidates, self.hashes(request), turn)
        if choice is not None:
            self.record(choice)
        return choice

    def _match(self, address: str, hashes: Sequence[bytes]) -> int:
        index = self.indexes.get(address)
        return 0 if index is None else index.match(hashes)

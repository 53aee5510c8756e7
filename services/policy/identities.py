"""Security identities: numbers for label sets and CIDRs, stable on this node.

The same label set always gets the same identity (they are persisted, so a
restart changes nothing); CIDRs named in rules get node-local identities from
FIRST_CIDR_IDENTITY up, as Cilium numbers them. Reserved identities (host,
world) are fixed.
"""

from __future__ import annotations

from services.common.datapath import FIRST_CIDR_IDENTITY, FIRST_LABEL_IDENTITY, ReservedIdentity
from services.common.errors import ResourceExhausted
from services.common.store import Store
from services.prefilter.cidr import Network

KIND = "identity"
MAX_LABEL_IDENTITY = FIRST_CIDR_IDENTITY - 1
RESERVED_LABELS = {ReservedIdentity.HOST: "reserved:host", ReservedIdentity.WORLD: "reserved:world"}


def label_key(labels: dict[str, str]) -> str:
    """Canonical text of a label set: sorted k=v, comma-separated."""
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def cidr_key(network: Network) -> str:
    return f"cidr:{network}"


class Identities:
    """Allocates and remembers identities; the store keeps them across restarts."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._by_key: dict[str, int] = {key: int(doc["id"]) for key, doc in store.items(KIND)}
        self._used = set(self._by_key.values())
        self._dirty: dict[str, int] = {}

    def _allocate(self, key: str, first: int, last: int) -> int:
        if key in self._by_key:
            return self._by_key[key]
        candidate = first
        while candidate in self._used and candidate <= last:
            candidate += 1
        if candidate > last:
            raise ResourceExhausted(f"no identity left between {first} and {last}")
        self._by_key[key] = candidate
        self._used.add(candidate)
        self._dirty[key] = candidate
        return candidate

    def flush(self) -> None:
        """Persist identities allocated since the last flush, in one transaction."""
        if self._dirty:
            with self._store.transaction():
                self._store.put_many(KIND, ((k, {"id": i}) for k, i in self._dirty.items()))
            self._dirty.clear()

    def for_labels(self, labels: dict[str, str]) -> int:
        return self._allocate(label_key(labels), FIRST_LABEL_IDENTITY, MAX_LABEL_IDENTITY)

    def for_cidr(self, network: Network) -> int:
        return self._allocate(cidr_key(network), FIRST_CIDR_IDENTITY, (1 << 32) - 1)

    def release_cidrs(self, keep: set[Network]) -> None:
        """Forget CIDR identities no rule names any more."""
        wanted = {cidr_key(n) for n in keep}
        gone = [k for k in self._by_key if k.startswith("cidr:") and k not in wanted]
        for key in gone:
            self._used.discard(self._by_key.pop(key))
            self._dirty.pop(key, None)
        if gone:
            with self._store.transaction():
                self._store.delete_many(KIND, gone)

    def labels_of(self) -> dict[int, str]:
        """Identity -> the text of what it stands for (labels, cidr:..., reserved:...)."""
        out: dict[int, str] = {int(i): text for i, text in RESERVED_LABELS.items()}
        out.update({i: key for key, i in self._by_key.items()})
        return out

"""`L7Proxy`: the desired L7 configuration of a node, kept in the store and served to Envoy.

The policy service (later) calls `set_listeners` for an endpoint with the listeners its
L7 rules need; everything is checked first (`model`), then the store is written in one
transaction with the next generation number, then that generation is built into Envoy
resources and published over xDS. A refused call changes neither the store nor Envoy.
On start the stored listeners are served again under the stored generation, so a
restarted service (or a restarted Envoy) gets the same configuration back.
"""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf import any_pb2
from google.protobuf.message import Message

from services.common.store import Store
from services.l7 import model
from services.l7.model import Listener
from services.l7.resources import Resources, build
from services.l7.xds import Ads

KIND = "listeners"  # key: endpoint name; doc: {"listeners": [...]}
GENERATION = "generation"  # the store's revision counter of the served configuration


@dataclass(frozen=True)
class Change:
    version: int
    changed: bool


class L7Proxy:
    """The listeners of every endpoint; owns what the xDS server serves."""

    def __init__(self, store: Store, ads: Ads) -> None:
        self._store = store
        self._ads = ads
        self._desired = model.Desired()

    # ---- life cycle (run on the worker: the store lives there) ----

    def start(self) -> None:
        """Read the stored listeners back and serve them under the stored generation."""
        endpoints = {}
        for endpoint, doc in self._store.items(KIND):
            endpoints[endpoint] = [Listener.from_doc(x) for x in doc["listeners"]]
        self._desired = model.Desired(endpoints)
        self._ads.publish(build(self._store.revision(GENERATION), self._desired.all()))

    def adopt(self) -> None:
        """Nothing in the datapath to adopt: Envoy takes its configuration from us."""
        self.start()

    def close(self) -> None:
        """Nothing to release: Envoy keeps its last configuration until the service is back."""

    # ---- domain ----

    def set_listeners(self, endpoint: str, listeners: list[Listener]) -> Change:
        """Replace every listener of ``endpoint`` at once (none: remove them)."""
        model.check_endpoint(endpoint, listeners)
        others = [x for name, xs in self._desired.endpoints.items() if name != endpoint for x in xs]
        model.check_node(endpoint, listeners, others)
        current = self._desired.endpoints.get(endpoint, [])
        if model.same(current, listeners):
            return Change(self._store.revision(GENERATION), False)
        endpoints = dict(self._desired.endpoints)
        if listeners:
            endpoints[endpoint] = sorted(listeners, key=lambda x: x.name)
        else:
            endpoints.pop(endpoint, None)
        desired = model.Desired(endpoints)
        with self._store.transaction():
            version = self._store.bump_revision(GENERATION)
            resources = build(version, desired.all())  # a failure here rolls the store back
            if listeners:
                self._store.put(KIND, endpoint, {"listeners": [x.to_doc() for x in endpoints[endpoint]]})
            else:
                self._store.delete(KIND, endpoint)
        self._desired = desired
        self._ads.publish(resources)
        return Change(version, True)

    def listeners(self, endpoint: str = "") -> dict[str, list[Listener]]:
        """Every endpoint's listeners (or one endpoint's; unknown: empty)."""
        if endpoint:
            found = self._desired.endpoints.get(endpoint)
            return {endpoint: list(found)} if found else {}
        return {name: list(xs) for name, xs in sorted(self._desired.endpoints.items())}

    def by_name(self) -> dict[str, Listener]:
        return {x.name: x for x in self._desired.all()}

    def publish_extra(self, type_url: str, name: str, resource: Message) -> int:
        """Serve one more resource that the API never builds, in a new generation; returns it.

        For tests that make Envoy refuse a configuration (a NACK): the stored listeners are
        not touched, so the next real change serves them again without it.
        """
        version = self._store.bump_revision(GENERATION)
        resources = build(version, self._desired.all())
        packed = any_pb2.Any()
        packed.Pack(resource)
        resources.by_type[type_url][name] = packed
        self._ads.publish(Resources(version, resources.by_type))
        return version

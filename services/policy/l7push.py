"""Hand each endpoint's L7 listeners to the l7 service, in the background, until it has them.

The policy maps never wait for Envoy: an entry with a proxy port sends its flows to the
proxy whether or not the listener is there yet, and no listener means the flow drops
(the datapath fails closed). So the policy service only has to get the listeners to the
l7 service eventually: `ListenerPush.set_listeners` records what every endpoint should have, and a
thread sends what changed (`SetListeners`), retrying while the l7 service is down. On the
first contact it also clears the listeners of endpoints policy no longer knows (a policy
service restarted while an endpoint went away).
"""

from __future__ import annotations

import threading
from pathlib import Path

import grpc
import structlog
from weir.l7.v1 import l7_pb2 as pb
from weir.l7.v1 import l7_pb2_grpc as pb_grpc

log = structlog.get_logger("weir.policy.l7")

RETRY_SECONDS = 1.0
CALL_TIMEOUT = 10.0


class ListenerPush:
    """What each endpoint's listeners should be, and a thread that makes the l7 service agree."""

    def __init__(self, socket_path: Path) -> None:
        self._target = f"unix://{socket_path}"
        self._lock = threading.Condition()
        self._desired: dict[str, list[pb.Listener]] = {}
        self._sent: dict[str, list[pb.Listener]] = {}
        self._cleared = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.last_error = ""

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="l7-push", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=CALL_TIMEOUT + 1)

    def set_listeners(self, desired: dict[str, list[pb.Listener]]) -> None:
        """Every endpoint's listeners (an endpoint left out has none)."""
        with self._lock:
            self._desired = {name: list(xs) for name, xs in desired.items() if xs}
            self._lock.notify_all()

    def _changed(self) -> set[str]:
        names = self._desired.keys() | self._sent.keys()
        return {n for n in names if self._desired.get(n, []) != self._sent.get(n, [])}

    def _run(self) -> None:
        with grpc.insecure_channel(self._target) as channel:
            stub = pb_grpc.L7Stub(channel)
            while True:
                with self._lock:
                    while not self._stopping and self._cleared and not self._changed():
                        self._lock.wait()
                    if self._stopping:
                        return
                    work = {n: list(self._desired.get(n, [])) for n in self._changed()}
                try:
                    if not self._cleared:
                        self._clear_unknown(stub)
                    for name, listeners in sorted(work.items()):
                        stub.SetListeners(pb.SetListenersRequest(endpoint=name, listeners=listeners),
                                          timeout=CALL_TIMEOUT)  # fmt: skip
                        with self._lock:
                            if listeners:
                                self._sent[name] = listeners
                            else:
                                self._sent.pop(name, None)
                    self.last_error = ""
                except grpc.RpcError as exc:
                    error = f"{exc.code().name}: {exc.details()}"
                    if error != self.last_error:
                        log.warning("l7 listeners not delivered; retrying", error=error)
                    self.last_error = error
                    with self._lock:
                        self._lock.wait(RETRY_SECONDS)

    def _clear_unknown(self, stub: pb_grpc.L7Stub) -> None:
        state = stub.GetState(pb.GetStateRequest(), timeout=CALL_TIMEOUT)
        with self._lock:
            for ep in state.endpoints:
                self._sent[ep.endpoint] = list(ep.listeners)
            self._cleared = True

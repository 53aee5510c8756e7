"""The common shape of an attached program: a value with a lifetime.

An attachment stays in the kernel until ``close()`` (alias ``detach()``) is
called. It is deliberately NOT detached when the Python object is garbage
collected or the process exits, even by SIGKILL: the datapath must survive a
restart of the service that installed it. A service that restarts finds its
programs through the query functions of each hook and takes over from there.
"""

from __future__ import annotations

from types import TracebackType

__all__ = ["Attachment"]


class Attachment:
    """Base of the per-hook attachments; subclasses implement ``_detach``."""

    _closed = False

    def _detach(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Detach from the hook (when still ours) and release held fds. Idempotent."""
        if self._closed:
            return
        self._detach()
        self._closed = True

    def detach(self) -> None:
        """Same as ``close()``."""
        self.close()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

"""Size limits of the orchestrator's requests, and how request text appears in messages and logs.

Every limit is checked before any work is done, so an oversized request allocates nothing
and changes nothing. Request text is shown summarised (bounded, escaped), never echoed whole:
a 100k-character name makes one short line, not a 100k-character log entry.
"""

from __future__ import annotations

from services.common.datapath import NUM_SLOTS, Hook

MAX_LABELS = 64  # labels per endpoint
MAX_LABEL_KEY = 317  # a DNS prefix (253), '/', a name (63)
MAX_LABEL_VALUE = 63
MAX_PROGRAMS = len(Hook) * NUM_SLOTS  # programs per registration: every slot of every hook once
MAX_NAME = 253  # service, owner, pin path components and the like
MAX_PATH = 4096  # PATH_MAX
MAX_EVENT_TYPES = 16
SHOWN = 64  # characters of request text a message or log line shows


def summary(text: str, shown: int = SHOWN) -> str:
    """``text`` as a message shows it: repr-escaped, cut to ``shown`` characters with its length."""
    if len(text) <= shown:
        return repr(text)
    return f"{text[:shown]!r}... ({len(text)} characters)"

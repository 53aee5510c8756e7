"""Moved to `services.common.validate`; kept only until services/policy imports it from there.

Nothing in the prefilter uses this module any more. Remove it once services/policy
(rules, maps, compute, identities, sources, policy) imports `Network`, `CidrError` and
`parse_cidr` from `services.common.validate`.
"""

from __future__ import annotations

from services.common.validate import CidrError, Network, is_host, parse_cidr

__all__ = ["CidrError", "Network", "is_host", "parse_cidr"]

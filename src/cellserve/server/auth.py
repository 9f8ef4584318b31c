"""Restricted API groups, as Triton's --http-restricted-api / --grpc-restricted-protocol: a group of endpoints
answers only requests that carry a header (HTTP) or metadata key (gRPC) with a given value. Missing gets 401
/ UNAUTHENTICATED, wrong gets 403 / PERMISSION_DENIED; the value is compared in constant time.

`--restricted-api model-repository,statistics:admin-key=SECRET` restricts those groups to that key; repeat it
for other groups and keys."""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass

GROUPS = ("inference", "model-repository", "model-config", "metadata", "statistics", "health")

GRPC_GROUPS = {"ServerLive": "health", "ServerReady": "health", "ModelReady": "health",
               "ServerMetadata": "metadata", "ModelMetadata": "metadata", "ModelInfer": "inference",
               "ModelStreamInfer": "inference", "ModelConfig": "model-config", "ModelStatistics": "statistics",
               "RepositoryIndex": "model-repository", "RepositoryModelLoad": "model-repository",
               "RepositoryModelUnload": "model-repository"}


@dataclass(frozen=True)
class Restriction:
    groups: frozenset[str]
    header: str  # lower case: HTTP headers and gRPC metadata keys compare so
    value: str


def parse_restriction(text: str) -> Restriction:
    """'model-repository,statistics:admin-key=SECRET' -> a Restriction; ValueError says what is wrong."""
    groups, sep, rest = text.partition(":")
    header, eq, value = rest.partition("=")
    names = frozenset(g.strip() for g in groups.split(",") if g.strip())
    if not sep or not eq or not names or not value or not re.fullmatch(r"[A-Za-z0-9-]+", header):
        raise ValueError(f"--restricted-api takes GROUPS:HEADER=VALUE like model-repository:admin-key=secret, not "
                         f"{text!r}")
    unknown = names - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown API group(s) {sorted(unknown)}; the groups are {', '.join(GROUPS)}")
    return Restriction(names, header.lower(), value)


def http_group(method: str, path: str) -> str | None:
    """The API group of an HTTP route (None: the docs pages and the live page's HTML, open to all)."""
    if path.startswith("/v2/repository"):
        return "model-repository"
    if path.startswith("/v2/health") or (path.startswith("/v2/models/") and path.endswith("/ready")):
        return "health"
    if path.endswith("/infer"):
        return "inference"
    if path.endswith("/config"):
        return "model-config"
    if path.endswith("/stats") or path in ("/metrics", "/api/live"):
        return "statistics"
    if path == "/v2" or path.startswith("/v2/models"):
        return "metadata"
    return None


def refusal(restrictions: list[Restriction], group: str | None, headers) -> tuple[int, str] | None:
    """(status, message) when a request of `group` with these headers (a mapping with lower-case keys) may
    not pass; None when it may."""
    if group is None:
        return None
    for r in restrictions:
        if group not in r.groups:
            continue
        given = headers.get(r.header)
        if given is None:
            return 401, f"the {group} API is restricted: send the {r.header!r} header"
        if not hmac.compare_digest(str(given).encode(), r.value.encode()):
            return 403, f"the {r.header!r} header does not allow the {group} API"
    return None

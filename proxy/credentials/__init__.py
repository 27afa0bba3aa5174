"""Credentials an attempt carries (SPEC 10): an OAuth2 client-credentials token or one key of a pool.

`TokenSource` (oauth2.py) and `KeyPool` (keys.py) hold the state; both live in
the policy's `PolicyState` and are applied by `proxy.layers.credentials`. Here
they are built from a policy's settings, with their secrets rendered, and
carried over a reload: the token source while its client (settings, id and
secret as rendered) is unchanged, each key's state while its value is.
"""

from __future__ import annotations

from pathlib import Path

from proxy import secrets
from proxy.clock import Clock
from proxy.config.model import Credentials
from proxy.credentials.keys import KeyPool
from proxy.credentials.oauth2 import SpanParent, TokenSource

__all__ = ["KeyPool", "SpanParent", "TokenSource", "build_key_pool", "build_token_source"]


def build_token_source(
    name: str, credentials: Credentials | None, base_dir: Path, clock: Clock, previous: TokenSource | None
) -> TokenSource | None:
    if credentials is None or credentials.oauth2 is None:
        return None
    oauth2 = credentials.oauth2
    client_id = secrets.render(oauth2.client_id, base_dir)
    client_secret = secrets.render(oauth2.client_secret, base_dir)
    if previous is not None and previous.same_client(oauth2, client_id, client_secret):
        return previous
    return TokenSource(name, oauth2, client_id, client_secret, clock)


def build_key_pool(
    name: str, credentials: Credentials | None, base_dir: Path, clock: Clock, previous: KeyPool | None
) -> KeyPool | None:
    if credentials is None or credentials.keys is None:
        return None
    values = [secrets.render(template, base_dir) for template in credentials.keys.values]
    return KeyPool(name, credentials.keys, values, clock, previous)

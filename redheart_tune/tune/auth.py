"""Ray's token authentication, decided before Ray is imported (Ray reads RAY_AUTH_MODE once, at import).

Ray 2.60 turns token authentication on for every new local cluster (the token is created once, in
``~/.ray/auth_token``) and warns so at each start unless it is asked for: ``ask_for_token_auth`` asks
(``RAY_AUTH_MODE=token``), which keeps it on without the warning; ``RAY_AUTH_MODE=disabled`` opts out.
A driver joining a cluster (``resources.address``) takes the cluster's own mode instead
(``match_cluster_auth``): the two must agree, and a driver with tokens on a cluster without them has
every actor cancelled before it runs ("The actor never ran").  This module imports no Ray at import.
"""

from __future__ import annotations

import os
import socket
import sys

AUTH_MODE = "RAY_AUTH_MODE"
_asked = False  # RAY_AUTH_MODE was set here (run.py's default), not by the user


def ask_for_token_auth() -> None:
    """Ask Ray for token authentication unless RAY_AUTH_MODE says otherwise; before Ray is imported."""
    global _asked
    if "ray" not in sys.modules and AUTH_MODE not in os.environ:  # Ray reads it once, at import
        os.environ[AUTH_MODE] = "token"
        _asked = True


def cluster_auth_mode(address: str) -> str | None:
    """'token' or 'disabled': what the cluster whose GCS is at ``address`` (host:port) asks of a client;
    None when that cannot be told (another kind of address, or nothing answers: ray.init says why).

    Asked as Ray's own clients are: a request without a token, which a cluster with tokens refuses at
    once (AuthenticationError) and one without them answers.  A request *with* a token cannot tell them
    apart: a cluster without tokens ignores it."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():  # "auto", a Ray Client ray:// address
        return None
    try:  # a quick look first: the GCS client waits 40 s on an address where nothing listens
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        return None
    from ray._raylet import Config, GcsClient
    from ray.exceptions import AuthenticationError

    before = os.environ.get(AUTH_MODE)
    os.environ[AUTH_MODE] = "disabled"
    Config.initialize("")  # Ray re-reads RAY_AUTH_MODE (as its own token set-up does)
    try:
        GcsClient(address=address).internal_kv_get(b"redheart-auth-probe", None, timeout=10)
        return "disabled"
    except AuthenticationError:
        return "token"
    except Exception:  # noqa: BLE001 (unreachable, or another Ray: ray.init reports it)
        return None
    finally:
        if before is None:
            os.environ.pop(AUTH_MODE, None)
        else:
            os.environ[AUTH_MODE] = before
        Config.initialize("")


def match_cluster_auth(address: str) -> None:
    """Before joining the cluster at ``address``: use its authentication mode, whatever RAY_AUTH_MODE
    says (a mode set by the user and differing is told in one line)."""
    mode = cluster_auth_mode(address)
    asked = os.environ.get(AUTH_MODE, "disabled").lower()
    if mode is None or mode == asked:
        return
    if not _asked:
        print(
            f"[ray] the cluster at {address} runs with RAY_AUTH_MODE={mode}; joining it so "
            f"(RAY_AUTH_MODE={asked} here)",
            file=sys.stderr,
            flush=True,
        )
    from ray._raylet import Config

    os.environ[AUTH_MODE] = mode
    Config.initialize("")

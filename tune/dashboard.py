"""Ray's token authentication and its dashboard, as ``run.py`` uses them.

Ray 2.60 turns token authentication on for every new local cluster (the token is created once, in
``~/.ray/auth_token``) and warns so at each start unless it is asked for: ``ask_for_token_auth`` asks
(``RAY_AUTH_MODE=token``), which keeps it on without the warning; ``RAY_AUTH_MODE=disabled`` opts out.
A driver joining a cluster (``resources.address``) takes the cluster's own mode instead
(``match_cluster_auth``): the two must agree, and a driver with tokens on a cluster without them has
every actor cancelled before it runs ("The actor never ran").

``run.py sweep|train|all --dashboard`` starts Ray with its dashboard bound to 127.0.0.1 (never every
interface) and prints how to sign in.  Ray's page asks for the token in a dialog ("Authentication Token
Required"); ``ray get-auth-token`` prints it.  The page posts it to ``/api/authenticate``, which sets an
HttpOnly cookie, ``ray-authentication-token``, for 30 days; Ray takes no token in the URL.  From another
machine, forward the port over ssh.  This module imports no Ray: Ray reads RAY_AUTH_MODE once, at import.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tune.config import Config

# The cookie Ray's /api/authenticate sets once the page has the token (ray/dashboard/http_server_head.py).
AUTH_COOKIE = "ray-authentication-token"


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


def start_dashboard(cfg: Config) -> None:
    """Start Ray with its dashboard (or join ``resources.address``'s cluster, whose dashboard it is) and
    print where it is and how to sign in.  The stages that follow find Ray up and use it; the dashboard
    ends with the command."""
    from tune.resources import cluster_address, start_ray

    context = start_ray(cfg, include_dashboard=True)
    if context is None:  # Ray was up already: whoever started it chose its dashboard
        return
    print("\n".join(dashboard_lines(context.dashboard_url, joined=bool(cluster_address(cfg)))), flush=True)


def dashboard_lines(url: str | None, *, joined: bool, auth_mode: str | None = None) -> list[str]:
    """What to open and how to sign in.  ``auth_mode``: RAY_AUTH_MODE (token unless it says disabled)."""
    if not url:
        return ["[dashboard] Ray started without its dashboard (it needs ray[default] installed)"]
    url = url if "://" in url else f"http://{url}"
    port = url.rstrip("/").rsplit(":", 1)[-1]
    auth_mode = (auth_mode or os.environ.get("RAY_AUTH_MODE", "token")).lower()
    where = (
        "the cluster's dashboard (resources.address)" if joined else "Ray's dashboard, on this machine only"
    )
    lines = [
        f"[dashboard] {where}: {url}",
        f"[dashboard] from another machine: ssh -N -L {port}:127.0.0.1:{port} {socket.gethostname()}, "
        f"then open http://127.0.0.1:{port}",
    ]
    if auth_mode == "disabled":
        lines.append(
            "[dashboard] no sign-in (RAY_AUTH_MODE=disabled): anyone who reaches the port can use it"
        )
    elif joined:
        lines.append(
            "[dashboard] sign in: the page asks for the cluster's token; `ray get-auth-token` on its head "
            "node prints it"
        )
    else:
        lines.append(
            "[dashboard] sign in: the page asks for Ray's token; paste what `ray get-auth-token` prints "
            "(~/.ray/auth_token); the browser keeps it in a cookie for 30 days"
        )
    lines.append("[dashboard] it stops with this command")
    return lines

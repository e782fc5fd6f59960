"""Ray's dashboard, as ``run.py`` uses it (its token authentication: ``redheart_tune.tune.auth``).

``run.py sweep|train|all --dashboard`` starts Ray with its dashboard bound to 127.0.0.1 (never every
interface) and prints how to sign in.  Ray's page asks for the token in a dialog ("Authentication Token
Required"); ``ray get-auth-token`` prints it.  The page posts it to ``/api/authenticate``, which sets an
HttpOnly cookie, ``ray-authentication-token``, for 30 days; Ray takes no token in the URL.  From another
machine, forward the port over ssh.  This module imports no Ray: Ray reads RAY_AUTH_MODE once, at import.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from redheart_tune.config import Config

# The cookie Ray's /api/authenticate sets once the page has the token (ray/dashboard/http_server_head.py).
AUTH_COOKIE = "ray-authentication-token"


def start_dashboard(cfg: Config) -> None:
    """Start Ray with its dashboard (or join ``resources.address``'s cluster, whose dashboard it is) and
    print where it is and how to sign in.  The stages that follow find Ray up and use it; the dashboard
    ends with the command."""
    from redheart_tune.tune.resources import cluster_address, start_ray

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

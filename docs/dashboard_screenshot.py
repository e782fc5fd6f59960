"""How docs/ray-dashboard.png was taken: headless Chromium signs in to Ray's dashboard the way its page does,
then photographs a page of it.  A one-off for the docs (CI needs no browser).

    python run.py sweep configs/smoke.yaml sweep.epochs=40 --dashboard > sweep.log &   # prints the address
    python docs/dashboard_screenshot.py http://127.0.0.1:8265 docs/ray-dashboard.png

Needs Debian's chromium (``apt-get install -y chromium``).  Signing in: the token ``ray get-auth-token``
prints is posted to the dashboard's ``/api/authenticate`` from inside the page, as its sign-in dialog does;
the dashboard answers with its HttpOnly cookie (``tune.dashboard.AUTH_COOKIE``), and the page is reloaded
with it.
Chromium is driven over its DevTools protocol with aiohttp, which Ray's dashboard already installs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import subprocess
import tempfile
import time
import urllib.request
from itertools import count
from pathlib import Path

CHROMIUM_FLAGS = [  # a machine with no display and a closed network
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PORT = 9333  # Chromium's DevTools, on loopback


async def shoot(url: str, out: Path, token: str, page: str, settle_s: float) -> None:
    import aiohttp

    with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/json/list") as r:
        target = next(t for t in json.load(r) if t["type"] == "page")
    ids = count(1)
    async with aiohttp.ClientSession() as session, session.ws_connect(target["webSocketDebuggerUrl"]) as ws:

        async def call(method: str, **params):
            i = next(ids)
            await ws.send_json({"id": i, "method": method, "params": params})
            async for msg in ws:
                reply = json.loads(msg.data)
                if reply.get("id") == i:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            raise RuntimeError("Chromium closed the connection")

        await call(
            "Emulation.setDeviceMetricsOverride", width=1440, height=1000, deviceScaleFactor=1, mobile=False
        )
        await call("Page.navigate", url=url)
        await asyncio.sleep(3)
        signed = await call(
            "Runtime.evaluate",
            expression=(
                f"fetch('api/authenticate', {{method: 'POST', headers: {{Authorization: 'Bearer {token}'}}}})"
                ".then(r => r.status)"
            ),
            awaitPromise=True,
        )
        if signed["result"].get("value") != 200:
            raise RuntimeError(f"the dashboard refused the token: {signed}")
        await call("Page.navigate", url=f"{url.rstrip('/')}/#/{page}")
        await call("Page.reload", ignoreCache=True)  # a fresh page: the dialog the first 401 opened is gone
        await asyncio.sleep(settle_s)  # the page polls the cluster; let its first answers arrive
        shot = await call("Page.captureScreenshot", format="png")
        out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("url", help="the dashboard's address, as run.py --dashboard printed it")
    parser.add_argument("out", type=Path, help="the PNG to write")
    parser.add_argument(
        "--page", default="overview", help="the dashboard's page (overview, jobs, actors, ...)"
    )
    parser.add_argument("--settle", type=float, default=10.0, help="seconds to let the page load its data")
    args = parser.parse_args()
    token = subprocess.run(
        ["ray", "get-auth-token"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        browser = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={PORT}"]
            + ["about:blank"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(3)
            asyncio.run(shoot(args.url, args.out, token, args.page, args.settle))
        finally:
            browser.terminate()
            browser.wait(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

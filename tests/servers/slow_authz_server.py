"""An authorization server that takes its time (for drain tests)."""

import asyncio
import os

from calloutkit import AuthzServer, allow_request


class SlowAuthz(AuthzServer):
    async def on_check(self, request, context):
        await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "1.5")))
        return allow_request(headers_to_set=[("x-slow", "done")])

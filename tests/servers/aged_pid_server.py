"""A callout that says, in the response, which process answered; connections age in 1 s.

Each request holds its ext_proc stream a few milliseconds (``HOLD_SECONDS``), so a load of
many clients keeps many streams in flight at once.
"""

import asyncio
import os

from calloutkit import CalloutServer, add_header_mutation
from calloutkit.runtime import _server

# What `workers > 1` ages connections after (30 s in production), shortened for the test.
_server._CONNECTION_AGE_MS = 1000
HOLD_SECONDS = float(os.environ.get("HOLD_SECONDS", "0.01"))


class AgedPidServer(CalloutServer):
    async def on_request_headers(self, headers, context):
        await asyncio.sleep(HOLD_SECONDS)
        return add_header_mutation(add=[("x-req-added", "yes")])

    def on_response_headers(self, headers, context):
        return add_header_mutation(add=[("x-worker-pid", str(os.getpid()))])

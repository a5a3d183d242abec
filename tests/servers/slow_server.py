"""A callout that takes its time over request headers (for drain tests)."""

import asyncio
import os

from calloutkit import CalloutServer, add_header_mutation


class SlowServer(CalloutServer):
    async def on_request_headers(self, headers, context):
        await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "1.5")))
        return add_header_mutation(add=[("x-slow", "done")])

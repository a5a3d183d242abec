"""A callout that answers at once, except for ``/slow`` requests (for drain tests)."""

import asyncio
import os

from calloutkit import CalloutServer, add_header_mutation, get_header


class GateServer(CalloutServer):
    async def on_request_headers(self, headers, context):
        if get_header(headers, ":path") == "/slow":
            await asyncio.sleep(float(os.environ.get("SLOW_SECONDS", "3")))
        return add_header_mutation(add=[("x-answered", "yes")])

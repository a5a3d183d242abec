"""A callout that says which process answered (for the workers test)."""

import os

from calloutkit import CalloutServer, add_header_mutation, nonblocking


class PidServer(CalloutServer):
    @nonblocking
    def on_request_headers(self, headers, context):
        return add_header_mutation(add=[("x-worker-pid", str(os.getpid()))])

"""An authorization server that names the process that answered (for workers tests)."""

import os

from calloutkit import AuthzServer, allow_request, nonblocking


class PidAuthz(AuthzServer):
    @nonblocking
    def on_check(self, request, context):
        return allow_request(headers_to_set=[("x-pid", str(os.getpid()))])

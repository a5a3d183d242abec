"""A callout whose callbacks log through their own logger (for the JSON log tests)."""

import logging

from calloutkit import CalloutServer

logger = logging.getLogger(__name__)


class LoggingServer(CalloutServer):
    def on_request_headers(self, headers, context):  # a def: runs in the thread pool
        logger.info("request headers: %d", len(headers.headers.headers))

    async def on_response_headers(self, headers, context):
        logger.info("response headers")
        if any(h.key == "x-fail" for h in headers.headers.headers):
            raise ValueError("asked to fail")

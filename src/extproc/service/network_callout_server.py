"""Alias of `calloutkit.NetworkCalloutServer` (L4, TCP) under the documented path."""

from envoy.service.network_ext_proc.v3.network_external_processor_pb2 import (
    ProcessingRequest,
    ProcessingResponse,
)

from calloutkit.network._server import NetworkCalloutServer, NetworkContext, ProcessingResult
from calloutkit.runtime._errors import ErrorPolicy

__all__ = [
    "ErrorPolicy",
    "NetworkCalloutServer",
    "NetworkContext",
    "ProcessingRequest",
    "ProcessingResponse",
    "ProcessingResult",
]

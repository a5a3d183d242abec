"""A callout that answers with who called it (for the mTLS tests)."""

from calloutkit import CalloutServer, add_header_mutation, nonblocking


class PeerServer(CalloutServer):
    @nonblocking
    def on_request_headers(self, headers, context):
        peer = context.peer_identity
        if peer is None:
            return add_header_mutation(add=[("x-peer", "-")])
        return add_header_mutation(add=[("x-peer", peer.common_name or "?"),
                                        ("x-peer-subject", peer.subject or "?"),
                                        ("x-peer-sans", ",".join(peer.subject_alternative_names))])

"""Envoy external authorization: ``envoy.service.auth.v3.Authorization/Check``.

- `_server`: `AuthzServer` (override ``on_check``) and `AuthzContext`.
- `_request`: `AuthzRequest`, the typed view of a `CheckRequest`, and `Headers`.
- `_tools`: `allow_request` and `deny_request`, the answers.
- `_client`: `AuthzClient` and `check_request`, for tests without Envoy.
- `_send`: ``calloutkit send --authz``.

Users import these names from `calloutkit` (and `calloutkit.testing`).
"""

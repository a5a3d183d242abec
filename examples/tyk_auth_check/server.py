"""API-key authentication: a CustomKeyCheck plugin that returns a session with a quota.

``ApiKeyAuth`` reads the key from ``X-Api-Key`` (or ``Authorization: Bearer <key>``), rejects
unknown keys with 401 and Tyk's JSON error, and accepts known ones with a session: rate limit
and quota from the key's plan, its owner in the metadata, and ``id_extractor_deadline`` so a
gateway with an ID extractor answers repeat requests from its cache for a minute without
calling the plugin. ``authorize`` sets ``metadata["token"]`` too, without which the gateway
answers 403. In the API definition::

    "custom_middleware": {"auth_check": {"name": "ApiKeyAuth"}, "driver": "grpc",
        "id_extractor": {"extract_from": "header", "extract_with": "value",
                         "extractor_config": {"header_name": "X-Api-Key"}}},
    "enable_coprocess_auth": true

Try it::

    calloutkit serve examples/tyk_auth_check
    calloutkit tyk dispatch --hook auth_check --name ApiKeyAuth --header 'X-Api-Key: demo-gold-key'
"""

from __future__ import annotations

import dataclasses
import time

from calloutkit.tyk import Hook, Plugin, PluginCall, TykPluginServer


@dataclasses.dataclass(frozen=True)
class Plan:
    rate: float  # requests ...
    per: float  # ... per this many seconds
    quota_max: int  # requests ...
    quota_renewal_rate: int  # ... per this many seconds


PLANS = {"gold": Plan(rate=100, per=1, quota_max=100_000, quota_renewal_rate=86_400),
         "free": Plan(rate=5, per=1, quota_max=1_000, quota_renewal_rate=86_400)}


@dataclasses.dataclass(frozen=True)
class Account:
    key_id: str  # what the gateway stores the session under; never the secret itself
    owner: str
    plan: str
    created: str  # a stable last_updated: changing it would reset the rate-limit buckets


# In a real deployment: a database or a secrets store.
KEYS = {
    "demo-gold-key": Account("acct-1001", "alice@example.com", "gold", "2024-01-01T00:00:00Z"),
    "demo-free-key": Account("acct-1002", "bob@example.com", "free", "2024-02-01T00:00:00Z"),
}
CACHE_SECONDS = 60


def presented_key(call: PluginCall) -> str:
    headers = call.request.headers
    if "X-Api-Key" in headers:
        return headers["X-Api-Key"]
    scheme, _, value = headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def api_key_auth(call: PluginCall) -> None:
    account = KEYS.get(presented_key(call))
    if account is None:
        call.reject(401, "missing or unknown API key", headers={"WWW-Authenticate": "ApiKey"})
        return
    plan = PLANS[account.plan]
    call.authorize(account.key_id, rate=plan.rate, per=plan.per, quota_max=plan.quota_max,
                   quota_renewal_rate=plan.quota_renewal_rate,
                   id_extractor_deadline=int(time.time()) + CACHE_SECONDS,
                   last_updated=account.created,
                   metadata={"owner": account.owner, "plan": account.plan})


class ApiKeyAuth(TykPluginServer):
    plugins = [Plugin("ApiKeyAuth", api_key_auth, hook=Hook.CUSTOM_KEY_CHECK)]


if __name__ == "__main__":
    ApiKeyAuth().run()

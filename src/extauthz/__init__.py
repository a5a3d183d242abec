"""``extauthz``: calloutkit's ext_authz server under the documented callout API's names."""

"""``extauthz.service``: aliases of calloutkit under the documented module names."""

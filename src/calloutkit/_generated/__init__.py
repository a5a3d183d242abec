"""Code generated from .proto files; regenerate it, never edit it (see calloutkit.tyk.codegen)."""

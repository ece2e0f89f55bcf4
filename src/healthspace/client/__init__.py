"""Typed HTTP clients of healthspace services, used by the CLI, the demo and tests."""

from healthspace.client.http import ApiError, AuthorityClient, ConnectorClient

__all__ = ["ApiError", "AuthorityClient", "ConnectorClient"]

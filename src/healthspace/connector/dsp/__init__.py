"""DSP 2025-1 on the connector: catalog, contract negotiation and transfer, as provider and consumer."""

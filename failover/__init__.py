"""failover: keeps stateful services available through crashes and software patches."""

__version__ = "0.1.0"

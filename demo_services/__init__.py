"""demo_services."""

"""Model builders (the tiny offline demo model)."""

"""meshproxy package."""

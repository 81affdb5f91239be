"""Response caching: exact and semantic lookups in front of the upstream."""

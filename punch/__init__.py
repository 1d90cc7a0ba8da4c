"""punch package."""

"""The Pigeon gate service."""

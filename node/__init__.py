"""The Pigeon node service."""

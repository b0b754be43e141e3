"""The Pigeon dispatcher service."""

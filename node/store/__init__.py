"""Message storage for nodes: the Store protocol and its implementations."""

"""The server's version: the one every service reports (in etcd, the OpenAPI document and its
logs). ``pigeon`` is a namespace package shared with the client distribution, so it has no
``__init__`` to hold it."""

__version__ = "0.1.0"

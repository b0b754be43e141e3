import os
import sys

# gRPC core writes to stderr on its own, outside the service's log format (a line per failed TLS
# handshake at its default level): only its errors. Read when gRPC loads, so set before that.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from dispatcher.app import main

sys.exit(main())

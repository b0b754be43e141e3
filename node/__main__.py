import sys

from node.app import main

sys.exit(main())

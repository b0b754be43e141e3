import sys

from gate.app import main

sys.exit(main())

import sys

from dispatcher.app import main

sys.exit(main())

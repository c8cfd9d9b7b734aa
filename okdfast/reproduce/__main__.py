import sys

from okdfast.reproduce.cli import main

sys.exit(main())

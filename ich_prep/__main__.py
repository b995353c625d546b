import sys

from ich_prep.cli import main

sys.exit(main())

"""`python -m ich_train ...` (also what torchrun launches: `torchrun ... -m ich_train fit ...`)."""

import sys

from ich_train.cli import main

sys.exit(main())

"""`python -m dspark.cli ...`: the same as the `dspark` command."""

import sys

from dspark.cli import main

sys.exit(main())

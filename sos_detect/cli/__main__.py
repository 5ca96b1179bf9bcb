"""`python -m sos_detect.cli`."""

import sys

from sos_detect.cli import main

sys.exit(main())

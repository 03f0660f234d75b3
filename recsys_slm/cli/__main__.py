import sys

from recsys_slm.cli import main

sys.exit(main())

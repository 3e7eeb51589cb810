"""python -m x2v.server (LightX2V: python -m lightx2v.server)."""

import sys

from x2v.cli.serve import main

sys.exit(main())

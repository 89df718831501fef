import sys

from kfs.cli import main

sys.exit(main())

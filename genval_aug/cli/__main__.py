import sys

from genval_aug.cli import main

sys.exit(main())

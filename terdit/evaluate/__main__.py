import sys

from .evaluate_cli import main

sys.exit(main())

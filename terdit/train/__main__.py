import sys

from .train_cli import main

sys.exit(main())

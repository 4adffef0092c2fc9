"""`python -m trainer <command>`: train, plan, eval, score."""

import sys

from trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())

"""``python run.py <command>``: the same command line as the installed ``redheart-tune`` (redheart_tune/cli.py)."""

import sys

from redheart_tune.cli import main

if __name__ == "__main__":
    sys.exit(main())

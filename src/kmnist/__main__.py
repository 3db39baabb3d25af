"""`python -m kmnist` runs the command-line tool."""

from kmnist.cli import main

raise SystemExit(main())

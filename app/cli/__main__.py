"""`python -m app.cli` (how --detach and --hosts start mixchat again): the `mixchat` command."""

import sys

from app.cli import main

sys.exit(main())

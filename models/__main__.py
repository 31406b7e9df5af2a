"""`python -m models` is `blink build`."""

from models.commands.build import main

raise SystemExit(main())

"""`python -m models` is `blink build`."""

from models.build import main

raise SystemExit(main())

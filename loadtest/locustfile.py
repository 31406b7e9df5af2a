"""Locust entry point for Blink (run from the repository root, which holds the `loadtest` package).

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000            # web UI, closed loop
    locust -f loadtest/locustfile.py --headless --host URL -u 2 -t 30s \
        OpenLoopUser --user-rate 100 --stop-timeout 30                       # 200 requests/s
    python -m loadtest.run --scenario closed|open|step                       # report included

The step-load shape is in loadtest/shapes.py; add it with
`-f loadtest/locustfile.py,loadtest/shapes.py`.
"""

from loadtest.users import ClosedLoopUser, OpenLoopUser

__all__ = ["ClosedLoopUser", "OpenLoopUser"]

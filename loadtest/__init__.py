"""Load tests: Locust users and shapes, and the headless runner that writes reports."""

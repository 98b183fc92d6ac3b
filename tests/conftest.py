import os

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "tests.support.broker",
    "tests.support.system",
    "tests.support.scenario",
    "tests.support.simulators",
    "tests.support.firmware",
    "tests.support.console",
]

# Two cores run broker, controller, fleet and tests at once: wall-clock deadlines would make
# property tests fail for reasons that are not bugs. CI replays a fixed sequence of examples.
settings.register_profile("wardcast", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", parent=settings.get_profile("wardcast"), derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "wardcast")

pytest_plugins = ["tests.support.broker", "tests.support.system", "tests.support.scenario"]

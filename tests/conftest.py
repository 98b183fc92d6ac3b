pytest_plugins = ["tests.support.broker"]

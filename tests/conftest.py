pytest_plugins = ["tests.conftest_etcd", "tests.conftest_store"]

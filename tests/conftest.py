pytest_plugins = [
    "tests.conftest_cluster",
    "tests.conftest_etcd",
    "tests.conftest_hangs",
    "tests.conftest_store",
]

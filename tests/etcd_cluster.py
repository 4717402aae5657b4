"""The etcd_cluster fixture: a real 3-member etcd for the HA tests (cmsupervisor.ha.localetcd)."""

import pytest

from cmsupervisor.ha.localetcd import ETCD, INSTALL_HINT, EtcdCluster


@pytest.fixture
def etcd_cluster(tmp_path):
    """A started 3-member etcd cluster, stopped at teardown."""
    if ETCD is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.start()
    yield cluster
    cluster.stop()

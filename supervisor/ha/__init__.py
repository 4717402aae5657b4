"""High availability: a hot standby supervisor fed through etcd."""

"""RESTCONF (RFC 8040): the YANG modules generated from the agents' declarations, and the HTTP front serving them."""

"""The supervisor's front: the client socket, control requests, routing and the wait-for graph."""

"""RFC 8040 errors: what the server answers when a request cannot be served (section 7)."""

import json

MEDIA = "application/yang-data+json"


class RestconfError(Exception):
    """An answer of ``status`` with one ``ietf-restconf:errors`` error: its error-tag, message,
    error-type (protocol or application) and error-path (an instance-identifier, or None);
    ``headers`` go with it (Allow for a 405, WWW-Authenticate for a 401)."""

    def __init__(self, status, tag, message, path=None, kind="application", headers=()):
        super().__init__(message)
        self.status = status
        self.tag = tag
        self.message = str(message)
        self.path = path
        self.kind = kind
        self.headers = list(headers)

    def body(self):
        error = {"error-type": self.kind, "error-tag": self.tag}
        if self.path is not None:
            error["error-path"] = self.path
        error["error-message"] = self.message
        return json.dumps({"ietf-restconf:errors": {"error": [error]}}, ensure_ascii=False).encode() + b"\n"


def not_found(message, path=None):
    return RestconfError(404, "invalid-value", message, path)


def bad_value(message, path=None):
    return RestconfError(400, "invalid-value", message, path)


def malformed(message):
    return RestconfError(400, "malformed-message", message, kind="protocol")


def not_allowed(method, allowed, what):
    """405 for ``method`` on a resource that takes only ``allowed`` (the Allow header)."""
    return RestconfError(
        405,
        "operation-not-supported",
        f"{method} is not supported on {what}; it takes {', '.join(allowed)}",
        kind="protocol",
        headers=[("Allow", ", ".join(allowed))],
    )


def unavailable(message):
    return RestconfError(503, "resource-denied", message)

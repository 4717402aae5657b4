"""A simulation of the switch's ``exos.api.vlan``, for running EXOS apps off a switch.

Only a switch has ``exos.api.vlan``; cmactor leaves it out. This file stands in for
it in the example (``[exos] path = ["sim"]`` in examples/exos/cmactor.toml serves
``sim/exos/api/vlan.py`` as ``exos.api.vlan``), so that an app written for the switch,
``stpauto.py`` here, runs unchanged.

What it models: the notifications ``notify.vlan_create`` and ``notify.vlan_delete``.
An app subscribes with ``vlan.notify.vlan_create.add_observer(callback)`` and the
callback is called with keyword arguments ``vlan_name`` (str) and ``vlan_id`` (the
tag, an int), as on the switch; ``remove_observer(callback)`` unsubscribes. Where the
switch learns of vlans from its own vlan manager, this one reads the example's config
manager: a daemon thread, started by the first ``add_observer``, walks
``vlanmgr.vlan`` (columns ``name``, ``tag``) with ``exos_dbapi`` every ``poll``
seconds and announces the vlans that appeared and disappeared since the last walk.

- **No replay.** The vlans that exist when the first observer subscribes are the
  baseline and are not announced, which is what the platform's apps expect: they
  subscribe, then walk the vlans already configured themselves (ezvxlan does; so does
  stpauto). The baseline is read before ``add_observer`` returns, so a vlan created
  after it is announced and one created before is in the app's walk (a vlan may be
  in both; apps treat a create as idempotent). If vlanmgr cannot be read then, the
  first walk that succeeds is the baseline.
- **Latency.** A change is announced up to ``poll`` seconds after it is made, on the
  polling thread. A vlan created and deleted within one poll is never announced; a
  vlan deleted and created again within one poll is announced as neither.
- **Failures.** A walk that fails (vlanmgr restarting, say) announces nothing and is
  retried at the next poll: vlans are not "deleted" because they could not be read.
  An observer that raises is logged with its traceback; the others are still called
  and polling goes on.
- **Not modelled**: the port notifications (``vlan_port_create`` and friends, whose
  callbacks get a ``port`` argument), the NSI ones, tag changes of an existing vlan,
  and the rest of the switch's vlan API. Asking for one is an AttributeError saying so.

Settings (module attributes, read at each poll): ``poll`` (seconds; default 1, or the
environment variable ``EXOS_SIM_VLAN_POLL``, which the agent's ``env`` key in
cmactor.toml can set), ``MODULE`` and ``TABLE`` (where vlans are read from).
"""

import logging
import os
import threading
import time

from exos.api import exos_dbapi as dbapi

log = logging.getLogger("exos.api.vlan")


def _poll_from_env():
    text = os.environ.get("EXOS_SIM_VLAN_POLL", "1")
    try:
        seconds = float(text)
    except ValueError:
        seconds = 0.0
    if not seconds > 0:
        raise ValueError(f"EXOS_SIM_VLAN_POLL: expected a number of seconds above 0, got {text!r}")
    return seconds


poll = _poll_from_env()
MODULE = "vlanmgr"
TABLE = "vlan"

# Guards the observer lists and the last walk: observers are added from any of the
# app's threads while the poller reads them. Never held across a walk or a callback.
_lock = threading.Lock()
# Held across the first subscription's walk, so that a second subscriber waits until
# the baseline it relies on has been read.
_start_lock = threading.Lock()
_known = None  # {vlan name: tag} at the last walk that succeeded; None before the first
_poller = None


class Notification:
    """One of the switch's notifications: observers are called with its keyword arguments."""

    def __init__(self, name):
        self.name = name
        self._observers = []

    def add_observer(self, callback):
        """Call ``callback(**kwargs)`` at each notification; a callback added twice is called once."""
        with _lock:
            if callback not in self._observers:
                self._observers.append(callback)
        _subscribed()

    def remove_observer(self, callback):
        """Stop calling ``callback``; one that was never added is ignored."""
        with _lock:
            if callback in self._observers:
                self._observers.remove(callback)

    def _announce(self, **kwargs):
        with _lock:
            observers = list(self._observers)
        for callback in observers:
            try:
                callback(**kwargs)
            except Exception:
                log.exception("%s observer %r raised on %s", self.name, callback, kwargs)

    def __repr__(self):
        return f"<simulated exos.api.vlan.notify.{self.name}>"


class _Notify:
    def __init__(self):
        self.vlan_create = Notification("vlan_create")
        self.vlan_delete = Notification("vlan_delete")

    def __getattr__(self, name):
        # Only reached for names not set above: say it is the simulation that lacks it.
        raise AttributeError(
            f"exos.api.vlan.notify.{name} is not simulated: the example's simulation of exos.api.vlan "
            f"({__file__}) has notify.vlan_create and notify.vlan_delete only"
        )


notify = _Notify()


def _read():
    """{name: tag} of every vlan: a getnext walk of MODULE.TABLE with its index left open."""
    table = dbapi.Table(MODULE, TABLE)
    name, tag = dbapi.Column(table, "name"), dbapi.Column(table, "tag")
    req = dbapi.request(dbapi.CM_OP_GET)
    req._op_flag |= dbapi.CM_FLAG_GETNEXT
    req.add_index(name)
    req.add_field("name", name)
    req.add_field("tag", tag)
    conn = dbapi.connect()
    try:
        cursor = conn.cursor()
        cursor.execute(req)
        return {row.field_values["name"]: row.field_values["tag"] for row in cursor.iterrow()}
    finally:
        conn.close()


def _vlan_id(tag):
    # The switch passes the tag as a number; a tag vlanmgr holds is always digits.
    return int(tag) if tag.isdigit() else tag


def _subscribed():
    """At the first subscription: read the baseline, then start the poller."""
    global _known, _poller
    with _start_lock:
        if _poller is not None:
            return
        try:
            baseline = _read()
        except dbapi.Error as exc:
            baseline = None
            log.warning("vlans not read at subscription (%s); the first walk that succeeds is the baseline", exc)
        with _lock:
            _known = baseline
        _poller = threading.Thread(target=_poll_forever, name="exos-sim-vlan-poll", daemon=True)
        _poller.start()


def _poll_forever():
    failing = False
    # It runs while it is the module's poller: setting _poller to None stops it at its
    # next poll (a test of this module does, to leave no thread behind).
    while True:
        time.sleep(poll)
        if _poller is not threading.current_thread():
            return
        try:
            _poll_once()
        except dbapi.Error as exc:
            # Said once per outage, not at every poll.
            if not failing:
                log.warning("vlan notifications paused: %s.%s not read: %s", MODULE, TABLE, exc)
            failing = True
            continue
        except Exception:
            log.exception("vlan poll failed")  # a bug here must not end the notifications
            continue
        if failing:
            log.info("vlan notifications resumed: %s.%s read again", MODULE, TABLE)
        failing = False


def _poll_once():
    global _known
    current = _read()
    with _lock:
        previous, _known = _known, current
    if previous is None:
        return  # this walk is the baseline
    for name in sorted(set(previous) - set(current)):
        notify.vlan_delete._announce(vlan_name=name, vlan_id=_vlan_id(previous[name]))
    for name in sorted(set(current) - set(previous)):
        notify.vlan_create._announce(vlan_name=name, vlan_id=_vlan_id(current[name]))

"""The EXOS platform modules that make sense off a switch: ExosLogger and Severity on
stdlib logging, dm's process states from the supervisor, and the tlv codec; in this
process, and inside real workers."""

import inspect
import logging
import os
import time

import pytest
from helpers import wait_for
from hypothesis import given, strategies as st

from cmactor.errors import OperationalError, ProgrammingError
from cmactor.exos.api import ExosLogger, Severity, dm, tlv

# -- ExosLogger and Severity ---------------------------------------------------------------


class Records(logging.Handler):
    """Keeps every record it is handed."""

    def __init__(self):
        super().__init__(logging.NOTSET)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def component(request):
    """A component name of this test's own, its logger at level 1 (every severity on)
    with a Records handler: (name, records)."""
    name = f"exoshost_{request.node.originalname}"
    logger = logging.getLogger(name)
    handler = Records()
    logger.addHandler(handler)
    logger.setLevel(1)
    yield name, handler.records
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def registered(name, *conditions):
    """An ExosLogger for ``name`` with ``conditions`` (add_condition args) added, registered."""
    elog = ExosLogger(name, "Test logger", 1)
    for args, kwargs in conditions:
        elog.add_condition(*args, **kwargs)
    elog.register()
    return elog


def cond(*args, **kwargs):
    return args, kwargs


def test_severities_are_logging_levels_in_ems_order_with_names():
    assert [Severity.CRITICAL, Severity.ERROR, Severity.WARNING, Severity.INFO, Severity.DEBUG_SUMMARY] == [
        logging.CRITICAL,
        logging.ERROR,
        logging.WARNING,
        logging.INFO,
        logging.DEBUG,
    ]
    assert logging.INFO < Severity.NOTICE < logging.WARNING
    assert 0 < Severity.DEBUG_DATA < Severity.DEBUG_VERBOSE < Severity.DEBUG_SUMMARY == logging.DEBUG
    assert list(Severity) == sorted(Severity, reverse=True)  # declared most severe first
    # A record's levelname is the severity's, where logging had no name for its level.
    assert [logging.getLevelName(s.value) for s in (Severity.NOTICE, Severity.DEBUG_VERBOSE, Severity.DEBUG_DATA)] == [
        "NOTICE",
        "DEBUG_VERBOSE",
        "DEBUG_DATA",
    ]
    assert logging.getLevelName(logging.DEBUG) == "DEBUG"  # a name logging has is left alone


def test_the_documented_example_logs_each_condition_at_its_severity(component):
    name, records = component
    elog = ExosLogger(name, "Example Logger", 1)
    elog.add_condition("simple", "Just a simple message")
    elog.add_condition("crit_cond", "Critical condition!", sev=Severity.CRITICAL)
    elog.add_condition("could_not_open", "Unable to open %tgt% with %opt%", ["tgt", "opt"], sev=Severity.ERROR)
    elog.register()
    elog.simple()
    elog.crit_cond()
    elog.could_not_open(tgt="/etc/x", opt="ro")
    elog.could_not_open("/etc/y", "rw")  # positional: in declared order
    elog.could_not_open("/etc/z", opt=3)  # mixed; values are shown as str()
    assert [(r.name, r.levelno, r.getMessage()) for r in records] == [
        (name, logging.INFO, "Just a simple message"),  # INFO unless sev= says
        (name, logging.CRITICAL, "Critical condition!"),
        (name, logging.ERROR, "Unable to open /etc/x with ro"),
        (name, logging.ERROR, "Unable to open /etc/y with rw"),
        (name, logging.ERROR, "Unable to open /etc/z with 3"),
    ]
    assert elog.logger is logging.getLogger(name)
    assert elog.conditions == ["simple", "crit_cond", "could_not_open"]


def test_a_record_names_the_callers_line_and_carries_the_condition(component):
    name, records = component
    elog = registered(name, cond("opened", "Opened %path%", ["path"], sev=Severity.NOTICE))
    call_line = inspect.currentframe().f_lineno + 1
    elog.opened(path="/tmp/a b")
    (record,) = records
    assert (record.filename, record.lineno) == (os.path.basename(__file__), call_line)
    assert record.levelname == "NOTICE"
    assert (record.exos_component, record.exos_condition, record.exos_params) == (name, "opened", {"path": "/tmp/a b"})


def test_percent_signs_that_name_no_param_stay_as_written(component):
    name, records = component
    elog = registered(name, cond("load", "CPU at 100% (%pct%%) on %slot%", ["pct", "slot"]))
    elog.load(97, "slot-1")
    assert records[0].getMessage() == "CPU at 100% (97%) on slot-1"


def test_every_severity_reaches_a_handler_at_its_level(component):
    name, records = component
    conditions = [cond(s.name.lower(), f"said at {s.name}", sev=s) for s in Severity]
    elog = registered(name, *conditions)
    for severity in Severity:
        getattr(elog, severity.name.lower())()
    assert [(r.levelno, r.levelname, r.getMessage()) for r in records] == [
        (s.value, logging.getLevelName(s.value), f"said at {s.name}") for s in Severity
    ]


def test_a_severity_below_the_loggers_level_is_not_logged_but_a_bad_call_still_fails(component):
    name, records = component
    elog = registered(name, cond("detail", "Detail %x%", ["x"], sev=Severity.DEBUG_DATA))
    logging.getLogger(name).setLevel(logging.DEBUG)
    elog.detail(x=1)
    assert records == []
    with pytest.raises(TypeError, match="missing a required argument: 'x'"):
        elog.detail()


def test_records_reach_the_root_loggers_handlers(component):
    name, _ = component
    root_records = Records()
    logging.getLogger().addHandler(root_records)
    try:
        registered(name, cond("up", "Up")).up()
    finally:
        logging.getLogger().removeHandler(root_records)
    assert [(r.name, r.getMessage()) for r in root_records.records] == [(name, "Up")]


def test_a_condition_is_an_error_before_register_naming_it():
    elog = ExosLogger("exoshost_early", "Early", 1)
    elog.add_condition("simple", "Just a simple message")
    with pytest.raises(AttributeError, match=r"condition 'simple' is not usable before register\(\)"):
        elog.simple()
    with pytest.raises(AttributeError, match=r"has no condition or attribute 'smple'; its conditions: simple"):
        elog.smple()  # noqa: B018 (the attribute itself is what fails)
    assert not hasattr(elog, "simple")  # hasattr answers, as for any missing attribute


def test_adding_or_registering_after_register_is_an_error():
    elog = ExosLogger("exoshost_late", "Late", 1)
    elog.add_condition("first", "First")
    elog.register()
    with pytest.raises(RuntimeError, match=r"cannot add condition 'second': the logger is registered already"):
        elog.add_condition("second", "Second")
    with pytest.raises(RuntimeError, match=r"registered already; register\(\) once"):
        elog.register()
    with pytest.raises(AttributeError, match="'second'"):
        elog.second()


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("simple", ValueError, "condition 'simple' is added already"),
        ("not-an-id", ValueError, "condition name 'not-an-id' must be a Python identifier"),
        ("class", ValueError, "condition name 'class' must be a Python identifier"),
        (3, ValueError, "condition name 3 must be a Python identifier"),
        ("register", ValueError, "condition name 'register' clashes with the logger's own attribute"),
        ("add_condition", ValueError, "'add_condition' clashes"),
        ("logger", ValueError, "'logger' clashes"),
        ("component", ValueError, "'component' clashes"),
        ("conditions", ValueError, "'conditions' clashes"),
        ("_private", ValueError, "'_private' clashes"),
    ],
)
def test_a_bad_condition_name_is_refused_naming_it(name, error, match):
    elog = ExosLogger("exoshost_names", "Names", 1)
    elog.add_condition("simple", "Simple")
    with pytest.raises(error, match=match):
        elog.add_condition(name, "Message")
    assert elog.conditions == ["simple"]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (("Open %path%",), {}, ValueError, r"message names %path%, which is not one of its params \(none declared\)"),
        (("Open %path%", ["file"]), {}, ValueError, r"message names %path%, which is not one of its params \(file\)"),
        ((b"bytes",), {}, TypeError, "message must be a str, got bytes"),
        (("M", "tgt"), {}, TypeError, "params must be a list of names, got 'tgt'"),
        (("M", ["a b"]), {}, ValueError, "param 'a b' must be a Python identifier"),
        (("M", ["x", "x"]), {}, ValueError, "params named more than once: x"),
        (("M",), {"sev": 25.0}, ValueError, r"sev must be one of Severity.CRITICAL, .*; got 25.0"),
        (("M",), {"sev": 99}, ValueError, "sev must be one of .*; got 99"),
        (("M",), {"sev": "ERROR"}, ValueError, "sev must be one of .*; got 'ERROR'"),
    ],
)
def test_a_bad_condition_is_refused_saying_what_is_wrong(args, kwargs, error, match):
    elog = ExosLogger("exoshost_bad", "Bad", 1)
    with pytest.raises(error, match=r"ExosLogger\('exoshost_bad'\).add_condition\('c'\): " + match):
        elog.add_condition("c", *args, **kwargs)
    assert elog.conditions == []


def test_a_severity_given_as_its_level_number_is_that_severity(component):
    name, records = component
    registered(name, cond("warn", "W", sev=logging.WARNING)).warn()
    assert records[0].levelno == Severity.WARNING


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("/x",), {}, "missing a required argument: 'opt'"),
        ((), {"opt": "ro"}, "missing a required argument: 'tgt'"),
        (("/x", "ro", "extra"), {}, "too many positional arguments"),
        (("/x",), {"opt": "ro", "mode": 1}, "got an unexpected keyword argument 'mode'"),
        (("/x",), {"tgt": "/y", "opt": "ro"}, "multiple values for argument 'tgt'"),
    ],
)
def test_a_call_with_missing_or_unknown_params_names_the_condition_and_them(component, args, kwargs, match):
    name, records = component
    elog = registered(name, cond("could_not_open", "Unable to open %tgt% with %opt%", ["tgt", "opt"]))
    with pytest.raises(TypeError, match=rf"^{name}\.could_not_open\(tgt, opt\): {match}"):
        elog.could_not_open(*args, **kwargs)
    assert records == []


@pytest.mark.parametrize(
    ("args", "error", "match"),
    [
        (("", "T", 1), ValueError, "component must be a non-empty str"),
        ((None, "T", 1), ValueError, "component must be a non-empty str"),
        (("c", None, 1), TypeError, "title must be a str"),
        (("c", "T", "1"), TypeError, "version must be an int, got '1'"),
        (("c", "T", True), TypeError, "version must be an int, got True"),
    ],
)
def test_a_bad_logger_is_refused_saying_what_is_wrong(args, error, match):
    with pytest.raises(error, match=match):
        ExosLogger(*args)


# -- tlv ------------------------------------------------------------------------------------

ITEMS = st.lists(st.tuples(st.integers(0, tlv.MAX_TYPE), st.binary(max_size=300)), max_size=20)


def test_the_layout_is_type_and_length_in_network_order_then_the_value():
    assert tlv.pack([(1, b"ab"), (0x0102, b""), (0xFFFF, b"\x00")]) == (
        b"\x00\x01\x00\x02ab" + b"\x01\x02\x00\x00" + b"\xff\xff\x00\x01\x00"
    )
    assert tlv.pack([]) == b"" and tlv.unpack(b"") == []
    assert tlv.HEADER_SIZE == 4


@given(ITEMS)
def test_unpack_reads_back_what_pack_wrote(items):
    packed = tlv.pack(items)
    assert len(packed) == sum(tlv.HEADER_SIZE + len(value) for _, value in items)
    assert tlv.unpack(packed) == items
    assert tlv.unpack(bytearray(packed)) == items == tlv.unpack(memoryview(packed))


def test_values_come_back_as_bytes_of_their_own_whatever_the_buffer():
    buffer = bytearray(tlv.pack([(7, b"abc")]))
    ((kind, value),) = tlv.unpack(buffer)
    buffer[4:7] = b"xyz"  # the caller reuses its buffer
    assert (kind, value, type(value)) == (7, b"abc", bytes)
    assert tlv.pack([(1, bytearray(b"v")), (2, memoryview(b"w"))]) == tlv.pack([(1, b"v"), (2, b"w")])


@given(ITEMS.filter(bool), st.data())
def test_input_cut_inside_an_item_names_the_items_offset(items, data):
    packed = tlv.pack(items)
    cut = data.draw(st.integers(0, len(packed) - 1))
    starts = [0]
    for _, value in items:
        starts.append(starts[-1] + tlv.HEADER_SIZE + len(value))
    if cut in starts:  # a cut between items leaves whole items
        assert tlv.unpack(packed[:cut]) == items[: starts.index(cut)]
        return
    broken = max(start for start in starts if start < cut)
    with pytest.raises(tlv.TLVError, match=f"^truncated item at offset {broken}: ") as caught:
        tlv.unpack(packed[:cut])
    assert caught.value.offset == broken


@given(st.binary(max_size=200))
def test_any_bytes_are_items_or_a_tlv_error_never_anything_else(data):
    try:
        items = tlv.unpack(data)
    except tlv.TLVError as exc:
        assert 0 <= exc.offset < len(data)
    else:
        assert tlv.pack(items) == data


@pytest.mark.parametrize(
    ("data", "offset", "match"),
    [
        (b"\x00", 0, "1 byte(s) left, but an item's header is 4"),
        (b"\x00\x01\x00", 0, "3 byte(s) left, but an item's header is 4"),
        (b"\x00\x01\x00\x00\x00\x02", 4, "2 byte(s) left, but an item's header is 4"),
        (b"\x00\x09\x00\x05abc", 0, "type 9 declares a value of 5 byte(s), but only 3 follow"),
        (b"\x00\x01\x00\x00" + b"\x00\x02\xff\xff", 4, "type 2 declares a value of 65535 byte(s), but only 0 follow"),
    ],
)
def test_malformed_input_says_where_and_what(data, offset, match):
    with pytest.raises(tlv.TLVError) as caught:
        tlv.unpack(data)
    assert str(caught.value) == f"truncated item at offset {offset}: {match}"
    assert caught.value.offset == offset
    assert isinstance(caught.value, ValueError)


@pytest.mark.parametrize("data", ["text", 5, None, [0, 1, 0, 0]])
def test_unpack_takes_bytes_only(data):
    with pytest.raises(TypeError, match=f"data must be bytes-like, got {type(data).__name__}"):
        tlv.unpack(data)


@pytest.mark.parametrize(
    ("items", "error", "match"),
    [
        ([(1, b"ok"), (-1, b"")], ValueError, r"item 1's type -1 is outside 0\.\.65535"),
        ([(65536, b"")], ValueError, r"item 0's type 65536 is outside 0\.\.65535"),
        ([(True, b"")], TypeError, "item 0's type must be an int, got bool True"),
        ([("1", b"")], TypeError, "item 0's type must be an int, got str '1'"),
        ([(1, "text")], TypeError, "item 0's value must be bytes-like, got str: encode it to bytes first"),
        ([(1, 5)], TypeError, "item 0's value must be bytes-like, got int$"),
        ([(1, b"x" * 65536)], ValueError, r"item 0 \(type 1\) has a value of 65536 bytes; at most 65535 fit"),
        ([(1, b"", 2)], TypeError, r"item 0 must be a \(type, value\) pair, got \(1, b'', 2\)"),
        ([7], TypeError, r"item 0 must be a \(type, value\) pair, got 7"),
    ],
)
def test_pack_refuses_what_does_not_fit_naming_the_item(items, error, match):
    with pytest.raises(error, match=r"^tlv\.pack\(\): " + match):
        tlv.pack(items)


def test_the_longest_value_fits():
    packed = tlv.pack([(3, b"v" * tlv.MAX_LENGTH)])
    assert packed[:4] == b"\x00\x03\xff\xff" and tlv.unpack(packed) == [(3, b"v" * tlv.MAX_LENGTH)]


# -- dm without a supervisor ----------------------------------------------------------------

DM_CALLS = {
    "get_process_state": lambda **kw: dm.get_process_state("app", **kw),
    "get_process_info": lambda **kw: dm.get_process_info("app", **kw),
    "is_process_ready": lambda **kw: dm.is_process_ready("app", **kw),
    "get_processes": lambda **kw: dm.get_processes(**kw),
    "wait_until_ready": lambda **kw: dm.wait_until_ready("app", 5, **kw),
}


@pytest.mark.parametrize("call", DM_CALLS.values(), ids=DM_CALLS)
def test_dm_without_a_supervisor_is_an_operational_error_naming_the_socket(call, tmp_path, monkeypatch):
    missing = str(tmp_path / "no.sock")
    started = time.monotonic()
    with pytest.raises(OperationalError, match=f"cannot reach a cmactor supervisor at {missing}"):
        call(socket=missing)
    assert time.monotonic() - started < 2  # not waited through: the socket says no at once
    monkeypatch.setenv("CMACTOR_SOCKET", missing)  # inside a worker: the supervisor's socket
    with pytest.raises(OperationalError, match=f"at {missing}"):
        call()


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), "5", None, True])
def test_wait_until_ready_refuses_a_timeout_that_is_not_seconds(timeout):
    with pytest.raises(
        ValueError, match=f"wait_until_ready\\('app'\\): timeout must be a finite number .*got {timeout!r}"
    ):
        dm.wait_until_ready("app", timeout)


def test_a_process_name_must_be_text():
    with pytest.raises(TypeError, match="a process name is a str, got int 5"):
        dm.get_process_state(5)
    with pytest.raises(TypeError, match="a process name is a str, got NoneType"):
        dm.wait_until_ready(None, 1)


# -- inside real workers ------------------------------------------------------------------

HOST_APP = """\
import sys
import time

from cmactor.cmbackend import CmAgent, cmbackend_init, ready
from cmactor.exos.api import ExosLogger, Severity, dm

elog = ExosLogger("hostapp", "Host test app", 1)
elog.add_condition("started", "Started as %name%, state %state% before ready()", ["name", "state"], sev=Severity.NOTICE)
elog.add_condition("could_not_open", "Unable to open %tgt% with %opt%", ["tgt", "opt"], sev=Severity.ERROR)
elog.register()


class App(CmAgent):
    def __init__(self, delay):
        super().__init__()
        self.delay = delay
        self.at_load = None

    def event_generate_default(self):
        time.sleep(self.delay)
        self.at_load = dm.get_process_state(sys.argv[0])
        elog.started(sys.argv[0], self.at_load)
        ready()

    def say_set(self, ctx):
        elog.could_not_open(ctx.params["tgt"], opt=ctx.params["opt"])

    def proc_get(self, ctx):
        name = ctx.params.get("name", sys.argv[0])
        try:
            info = dm.get_process_info(name)
        except dm.UnknownProcessError as exc:
            ctx.fields = {"error": f"{type(exc).__name__}: {exc}"}
            return
        ctx.fields = {
            "state": info.state,
            "pid": info.pid,
            "ready": dm.is_process_ready(name),
            "error": info.error,
            "at_load": self.at_load,
        }

    def procs_get(self, ctx):
        ctx.fields = {name: info.state for name, info in dm.get_processes().items()}

    def wait_get(self, ctx):
        started = time.monotonic()
        ready = dm.wait_until_ready(ctx.params["name"], float(ctx.params["timeout"]))
        ctx.fields = {"ready": ready, "took": time.monotonic() - started}


def main():
    cmbackend_init(App(float(sys.argv[1]) if len(sys.argv) > 1 else 0.0))
"""

# A plain process: READY, then it ends with this exit status.
ENDS = """\
import sys
import time
from cmactor.cmbackend import ready
ready()
time.sleep(0.3)
sys.exit(int(sys.argv[1]))
"""


@pytest.fixture
def host(supervisor, tmp_path):
    """A supervisor running the host app as "app" and "other", "dead" (FAILED) and "done"
    (STOPPED); once those two have ended."""
    app = tmp_path / "host_app.py"
    app.write_text(HOST_APP)
    ends = tmp_path / "ends.py"
    ends.write_text(ENDS)
    sup = supervisor(
        {
            "app": f"{app}:main",
            "other": f"{app}:main",
            "dead": {"entry": str(ends), "args": ["4"], "restart": "never"},
            "done": {"entry": str(ends), "args": ["0"], "restart": "on-failure"},
        }
    )
    wait_for(lambda: [sup.status()[name]["state"] for name in ("dead", "done")] == ["FAILED", "STOPPED"])
    return sup


def execute(sup, operation, **params):
    """The row ``operation`` answers, as {field: value}; None for a row of no fields."""
    with sup.connect() as conn:
        cur = conn.cursor()
        cur.execute(operation, params)
        return None if cur.description is None else dict(zip([d[0] for d in cur.description], cur.fetchone()))


def module_log(sup, name):
    with open(os.path.join(sup.state_dir, "logs", f"{name}.log"), encoding="utf-8") as f:
        return f.read()


def test_an_agents_conditions_land_in_its_modules_log(host):
    execute(host, "set app.say", tgt="/etc/x", opt="ro")
    log = wait_for(lambda: (lambda text: text if "Unable to open" in text else None)(module_log(host, "app")))
    assert " ERROR   hostapp: Unable to open /etc/x with ro\n" in log
    assert "hostapp: Started as app, state LOADING before ready()\n" in log
    assert "Unable to open" not in module_log(host, "other")  # each module's log is its own


def test_an_agent_asks_dm_about_itself_and_the_others(host):
    status = host.status()
    mine = execute(host, "get app.proc")
    assert mine == {
        "state": "READY",
        "pid": str(status["app"]["pid"]),
        "ready": "True",
        "error": None,
        "at_load": "LOADING",  # asked before it called ready()
    }
    assert execute(host, "get app.proc", name="other")["state"] == "READY"
    dead = execute(host, "get app.proc", name="dead")
    assert (dead["state"], dead["pid"], dead["ready"]) == ("FAILED", None, "False")
    assert "exit code 4" in dead["error"]
    done = execute(host, "get app.proc", name="done")
    assert (done["state"], done["ready"], done["error"]) == ("STOPPED", "False", None)
    assert execute(host, "get app.procs") == {"app": "READY", "dead": "FAILED", "done": "STOPPED", "other": "READY"}


def test_an_unknown_process_is_an_error_naming_it_and_the_ones_that_run(host):
    error = execute(host, "get app.proc", name="ghost")["error"]
    assert error.startswith("UnknownProcessError: no process 'ghost': unknown module 'ghost'")
    assert "app, dead, done, other" in error
    with pytest.raises(dm.UnknownProcessError, match="no process 'not a name'") as caught:
        dm.get_process_state("not a name", socket=host.socket_path)
    assert isinstance(caught.value, ProgrammingError) and isinstance(caught.value, LookupError)


def test_an_agent_waits_for_a_process_until_ready_or_the_timeout(host):
    assert execute(host, "get app.wait", name="other", timeout="5")["ready"] == "True"
    failed = execute(host, "get app.wait", name="dead", timeout="0.4")
    assert failed["ready"] == "False" and 0.4 <= float(failed["took"]) < 3


def test_wait_until_ready_waits_through_a_restart(supervisor, tmp_path):
    app = tmp_path / "host_app.py"
    app.write_text(HOST_APP)
    sup = supervisor({"slow": {"entry": f"{app}:main", "args": ["0.6"]}})
    pid = sup.status()["slow"]["pid"]
    sup.restart("slow")
    started = time.monotonic()
    assert dm.wait_until_ready("slow", 20, socket=sup.socket_path) is True
    assert time.monotonic() - started >= 0.5  # its load sleeps 0.6 s before ready()
    info = dm.get_process_info("slow", socket=sup.socket_path)
    assert (info.name, info.state, info.restarts) == ("slow", "READY", 1) and info.pid not in (None, pid)
    assert [(name, p.state, p.pid) for name, p in dm.get_processes(socket=sup.socket_path).items()] == [
        ("slow", "READY", info.pid)
    ]

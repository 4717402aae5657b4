"""``_exos_ext_cmfe``: the constants of the platform's C module behind its CM client.

Apps import a flag or two from it directly (``from _exos_ext_cmfe import
CM_FLAG_GETNEXT``); ``cmactor.exos_dbapi`` takes its constants from here, so the two
never disagree. The values are the platform's: an app that ORs a number it learnt
there into ``request._op_flag`` means the same thing here.
"""

# request(op=...)
CM_OP_GET = 1
CM_OP_SET = 2

# Row.opStatus: MORE on every row of a walk but the last, SUCCESS on the last,
# ERROR on a row that carries an error in its opMsg.
CM_OP_STATUS_SUCCESS = 0
CM_OP_STATUS_MORE = 1
CM_OP_STATUS_ERROR = 2

# Bits of request._op_flag. GETONE and GETNEXT choose the walk; the rest say where a
# request comes from (the platform's CM caches and audits by them). cmactor keeps
# them on the request; CLI also asks for the agent's notify_cli text.
CM_FLAG_GETONE = 0x01
CM_FLAG_GETNEXT = 0x02
CM_FLAG_DYNAMIC = 0x100000
CM_FLAG_OVSDB = 0x400000
CM_FLAG_SNMP = 0x1000000
CM_FLAG_CLI = 0x2000000
CM_FLAG_EPICENTER = 0x8000000

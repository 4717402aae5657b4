"""The name a test agent's get answers, for tables of rows keyed by one name column."""


def next_name(ctx, names, key="name"):
    """The row ``ctx`` asks for: a get's own, or for a getnext the first of ``names`` after
    the one it gives (ctx.more() when others follow); None when the walk is over."""
    if not ctx.is_getnext:
        return ctx.params[key]
    after = ctx.params.get(key)
    later = sorted(n for n in names if after is None or n > after)
    if not later:
        return None
    if len(later) > 1:
        ctx.more()
    return later[0]

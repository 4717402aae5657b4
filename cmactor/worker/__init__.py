"""The worker process: one per agent, its lanes, its channel to the supervisor, its direct socket."""

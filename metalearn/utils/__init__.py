"""Small helpers shared by the entry points: loggers, config printing, error reporting."""

"""Research variants behind a config switch, each in its own file; core code never branches on their internals."""

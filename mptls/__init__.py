"""mptls: secure multipath connections."""

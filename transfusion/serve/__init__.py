"""`transfusion serve`: the HTTP API and page (``app``), the one decoding loop behind them (``worker``),
and uploaded images read safely (``images``)."""

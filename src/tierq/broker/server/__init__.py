"""The embedded, wire-compatible QStash broker (``tierq broker``)."""

"""QStash: the client side (publishing, queue admin) and ``server/``, the embedded broker."""

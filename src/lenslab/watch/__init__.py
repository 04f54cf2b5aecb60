"""``lenslab watch``: keeps a box's runs going through preemptions (see ``watcher``)."""

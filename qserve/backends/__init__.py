"""Queue backends: what stores a queue's entries and dispatches them to consumer groups."""

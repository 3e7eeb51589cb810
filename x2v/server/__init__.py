"""x2v serve: the HTTP service, its task queue and its workers."""

"""Opt-in capture of the requests the API answers: a bounded local store, address redaction, and the
recorder that keeps the work off the request path."""

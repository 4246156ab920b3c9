"""Delayed messages: scheduling, admission, delivery, cleanup, queue figures."""

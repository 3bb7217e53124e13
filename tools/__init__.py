"""Runnable tools that are not services: the load test and the lean TGI double."""

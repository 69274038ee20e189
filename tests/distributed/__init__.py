"""End-to-end tests in the CeleryExecutor topology, run natively (``make test-distributed``)."""

"""Fault-injection tests on the embedded stack (make test-reliability); see docs/reliability.md."""

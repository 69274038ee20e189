"""The issue-3 benchmark (``make bench``): see bench/README.md and bench/run_bench.py."""

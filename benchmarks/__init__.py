"""FineTune Lab benchmarks: `python -m benchmarks.run [--only NAME] [--quick]` (see README.md here)."""

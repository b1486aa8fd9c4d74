"""The certification command lines (``deq-*`` console commands), thin wrappers over ``SRS.cli`` and ``SRS.analysis``."""

"""kfs: a FUSE filesystem that is the persistence layer of an agent system."""

__version__ = "0.1.0"

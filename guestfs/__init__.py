"""guestfs: a FUSE passthrough filesystem with a tmem second-chance page cache."""

__all__: list[str] = []

"""The LD_PRELOAD interposition shim and the reader of its determinant records."""

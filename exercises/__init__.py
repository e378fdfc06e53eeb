"""Your exercises, one file per chapter. Fill the stubs, then run `minillava grade chNN`."""
